//! The device seam: the only way the queue and the cache reach storage.

use std::any::Any;
use std::path::Path;
use std::ptr::NonNull;

use crate::error::Result;

/// A byte buffer a [`Device`] writes from (and the queue's request buffers are made of).
///
/// Each device chooses its own buffer type so that the production device can hand its
/// buffers straight to the kernel (aligned DMA memory) while the simulated one uses plain
/// heap memory.
pub trait IoBuf {
    /// The buffer's bytes.
    fn as_bytes(&self) -> &[u8];
    /// The buffer's bytes, mutably. Never called while a write of this buffer is in flight.
    fn as_bytes_mut(&mut self) -> &mut [u8];
}

/// A block-addressed store with a volatile write cache: aligned reads and writes of byte
/// ranges, a cache flush that makes completed writes durable, and discard.
///
/// Every offset and length must be a multiple of [`Device::alignment_bytes`], and a range must
/// lie inside [`Device::size_bytes`]; otherwise the call fails with
/// [`Error::Unaligned`](crate::Error::Unaligned) or
/// [`Error::BlockOutOfRange`](crate::Error::BlockOutOfRange) before any I/O.
///
/// The futures are not `Send`: a device lives on one core's executor (thread per core).
#[allow(async_fn_in_trait)] // by design: single-threaded executors, futures stay on their core
pub trait Device {
    /// The buffer type this device writes from (reads go straight into any byte slice).
    type Buf: IoBuf;

    /// The path of the file or device, for error messages.
    fn path(&self) -> &Path;
    /// The size of the device in bytes.
    fn size_bytes(&self) -> u64;
    /// The alignment of offsets, lengths and buffers (the logical block size), in bytes.
    fn alignment_bytes(&self) -> u64;
    /// Allocates a zeroed buffer of `len` bytes suitable for this device's I/O.
    fn alloc_buf(&self, len: usize) -> Self::Buf;
    /// [`Device::alloc_buf`] for a device that may be closed already: `None` then.
    fn try_alloc_buf(&self, len: usize) -> Option<Self::Buf> {
        Some(self.alloc_buf(len))
    }

    /// Reads `dst.len()` bytes at `offset` straight into `dst` (a cache frame, say), which
    /// is written only once the read succeeded: after an error, or if the future is dropped,
    /// `dst` holds its old bytes or some of the new ones.
    ///
    /// `dst` has no alignment in memory beyond a byte: a device that needs aligned memory
    /// (a kernel DMA target) reads into its own buffer and copies, as [`DmaDevice`] does with
    /// the buffer glommio's `read_at_aligned` returns. Its length follows the rules above.
    ///
    /// [`DmaDevice`]: super::DmaDevice
    async fn read_at(&self, offset: u64, dst: &mut [u8]) -> Result<()>;
    /// Reads `dst.len()` bytes at `offset` into memory lent for the read (a cache frame):
    /// [`DmaDevice`] has the kernel read straight into it, with no copy. The device drops
    /// the loan once nothing writes the memory any more, which may be after this future was
    /// dropped (the kernel may still be doing the read then).
    ///
    /// The default reads through [`Device::read_at`], within the future's life.
    ///
    /// [`DmaDevice`]: super::DmaDevice
    async fn read_in_place(&self, offset: u64, mut dst: ReadTarget) -> Result<()> {
        self.read_at(offset, dst.as_mut_slice()).await
    }
    /// Writes `buf` at `offset`. The write is durable only after a successful [`Device::flush`].
    async fn write_at(&self, offset: u64, buf: &Self::Buf) -> Result<()>;
    /// Makes every write completed before the call durable.
    async fn flush(&self) -> Result<()>;
    /// Discards `len` bytes at `offset`: later reads return zeroes.
    async fn discard(&self, offset: u64, len: u64) -> Result<()>;
}

/// Memory lent to a device for one read, with the loan that ends when it is dropped.
///
/// The lender (the cache) does not touch the memory while the loan lasts: a device may hand
/// the memory to the kernel and the loan with it, and drop the loan only when the kernel is
/// done, even if the read's future was dropped before that.
pub struct ReadTarget {
    ptr: NonNull<u8>,
    len: usize,
    loan: Box<dyn Any>,
}

impl std::fmt::Debug for ReadTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadTarget").field("ptr", &self.ptr).field("len", &self.len).finish()
    }
}

impl ReadTarget {
    /// `len` bytes at `ptr`, lent until `loan` is dropped.
    ///
    /// # Safety
    ///
    /// `ptr` must be valid for reads and writes of `len` bytes, and nothing else may free,
    /// read or write them until `loan` is dropped.
    pub unsafe fn new(ptr: NonNull<u8>, len: usize, loan: Box<dyn Any>) -> Self {
        ReadTarget { ptr, len, loan }
    }

    /// The number of bytes lent.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no byte is lent.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memory's address (for an alignment check).
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// The lent bytes, while the loan lasts.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: by `new`'s contract the bytes are valid and only this loan reaches them
        // while it lasts, and the borrow of `self` keeps the loan alive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The address, the length and the loan, for a device that hands the memory on (to the
    /// kernel) together with the loan.
    pub fn into_parts(self) -> (NonNull<u8>, usize, Box<dyn Any>) {
        (self.ptr, self.len, self.loan)
    }
}

/// Checks that `offset..offset + len` is aligned and inside a device of `size_bytes`.
pub(crate) fn check_range(offset: u64, len: u64, alignment: u64, size_bytes: u64) -> Result<()> {
    if !offset.is_multiple_of(alignment) || !len.is_multiple_of(alignment) || len == 0 {
        return Err(crate::Error::Unaligned { offset, len, alignment });
    }
    let end = offset.saturating_add(len);
    if end > size_bytes {
        return Err(crate::Error::BlockOutOfRange {
            block: (end - 1) / alignment,
            device_blocks: size_bytes / alignment,
        });
    }
    Ok(())
}
