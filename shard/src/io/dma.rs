//! The production device: a glommio [`DmaFile`] opened with `O_DIRECT` on a regular file or a
//! block device.

use std::cell::RefCell;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use glommio::io::{DmaBuffer, DmaFile, OpenOptions};
use glommio::GlommioError;

use super::device::{check_range, Device, IoBuf, ReadTarget};
use crate::error::{Error, IoOp, Result};

/// An aligned DMA buffer from glommio's allocator.
///
/// It is reference counted only so that a write can lend it to the kernel
/// ([`DmaFile::write_rc_at`]) and hand it back afterwards without a copy; outside a write it has
/// exactly one owner.
pub struct DmaBuf(Rc<DmaBuffer>);

impl std::fmt::Debug for DmaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaBuf").field("len", &self.0.len()).finish()
    }
}

impl IoBuf for DmaBuf {
    fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    fn as_bytes_mut(&mut self) -> &mut [u8] {
        Rc::get_mut(&mut self.0)
            .expect(
                "a DmaBuf is shared only while its write is in flight, and nobody touches it then",
            )
            .as_bytes_mut()
    }
}

/// A file or block device opened with `O_DIRECT` through glommio.
///
/// One `DmaDevice` is opened per shard on the same path; each is used only by the executor that
/// opened it.
pub struct DmaDevice {
    /// `None` once [`DmaDevice::close`] ran. Operations clone the `Rc` for their duration, so
    /// a close waits for none of them and the descriptor goes when the last one ends.
    file: RefCell<Option<Rc<DmaFile>>>,
    path: PathBuf,
    size_bytes: u64,
    alignment_bytes: u64,
    is_block_device: bool,
}

impl std::fmt::Debug for DmaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaDevice")
            .field("path", &self.path)
            .field("size_bytes", &self.size_bytes)
            .field("alignment_bytes", &self.alignment_bytes)
            .field("is_block_device", &self.is_block_device)
            .finish()
    }
}

impl DmaDevice {
    /// Opens `path` (a regular file or a block device) for reading and writing with `O_DIRECT`.
    ///
    /// Must be called inside a glommio executor. Fails with a clear error when the path is
    /// missing, is a directory or another special file, or when `O_DIRECT` cannot be put in
    /// effect.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let metadata = fs::metadata(&path).map_err(|e| Error::io(IoOp::Open, &path, 0, e))?;
        let file_type = metadata.file_type();
        let is_block_device = file_type.is_block_device();
        if file_type.is_dir() {
            return Err(Error::NotAFileOrDevice { path, kind: "directory" });
        }
        if !file_type.is_file() && !is_block_device {
            return Err(Error::NotAFileOrDevice { path, kind: "special file" });
        }
        if !is_block_device {
            prime_iopoll_probe_if_sparse(&path).await?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .dma_open(&path)
            .await
            .map_err(|e| Error::io(IoOp::Open, &path, 0, os_error(e)))?;
        ensure_direct_io(file.as_raw_fd(), &path)?;
        let (size_bytes, alignment_bytes) = if is_block_device {
            block_device_geometry(file.as_raw_fd())
                .map_err(|e| Error::io(IoOp::Open, &path, 0, e))?
        } else {
            (metadata.len(), file.alignment().max(512))
        };
        let file = RefCell::new(Some(Rc::new(file)));
        Ok(DmaDevice { file, path, size_bytes, alignment_bytes, is_block_device })
    }

    /// Whether `O_DIRECT` is set on the open file description right now (read back from the
    /// kernel with `fcntl(F_GETFL)`, not from what was asked for).
    pub fn direct_io_in_effect(&self) -> bool {
        // SAFETY: fcntl(F_GETFL) on a file descriptor this struct owns; no memory is passed.
        let Ok(file) = self.file() else { return false };
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        flags >= 0 && flags & libc::O_DIRECT != 0
    }

    /// Whether the path is a block device (as opposed to a regular file).
    pub fn is_block_device(&self) -> bool {
        self.is_block_device
    }

    /// Closes the file (asynchronously through glommio, while its reactor is alive). Later
    /// operations fail with [`Error::ShutDown`]. Must run on the executor before it stops:
    /// a `DmaFile` dropped after its executor is gone leaks its descriptor.
    pub async fn close(&self) -> Result<()> {
        let Some(file) = self.file.borrow_mut().take() else { return Ok(()) };
        file.close_rc().await.map(|_| ()).map_err(|e| self.err(IoOp::Close, 0, os_error(e)))
    }

    fn file(&self) -> Result<Rc<DmaFile>> {
        self.file.borrow().clone().ok_or(Error::ShutDown)
    }

    fn err(&self, op: IoOp, offset: u64, e: io::Error) -> Error {
        Error::io(op, &self.path, offset, e)
    }

    /// `Ok` if a read or write at `offset` moved all `len` bytes, else the short transfer's
    /// error.
    fn whole(&self, op: IoOp, offset: u64, done: usize, len: usize) -> Result<()> {
        if done == len {
            return Ok(());
        }
        let (kind, what) = match op {
            IoOp::Write => (io::ErrorKind::WriteZero, "write"),
            _ => (io::ErrorKind::UnexpectedEof, "read"),
        };
        let short = io::Error::new(kind, format!("short {what}: {done} of {len} bytes"));
        Err(self.err(op, offset, short))
    }
}

/// Works around a glommio 0.9 misdetection that breaks reads of sparse files.
///
/// When glommio opens the first file of a device on a thread, it probes whether the device
/// supports io_uring polled I/O by reading the file's first block through its poll ring, and
/// remembers the answer for the device in a thread-local map. If that block is a hole, the
/// read never reaches the device and succeeds, so a device without poll queues (virtio-blk,
/// loop) is taken as pollable, and every later read that does reach it fails with
/// `EOPNOTSUPP` (see tests/tests/regression_sparse_file_reads.rs). When the data file starts
/// with a hole, this first opens a small, fully written probe file beside it, so the probe
/// reads real data, gets the true answer, and glommio caches it before the data file opens.
async fn prime_iopoll_probe_if_sparse(path: &Path) -> Result<()> {
    let open_error = |e: io::Error| Error::io(IoOp::Open, path, 0, e);
    let file = fs::File::open(path).map_err(open_error)?;
    // SAFETY: lseek on a descriptor `file` owns; no memory is passed.
    let first_data = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_DATA) };
    drop(file);
    if first_data == 0 {
        return Ok(()); // block 0 holds data: glommio's probe is right on its own
    }
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let probe = dir.join(format!(
        ".corebuf-iopoll-probe-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let result = async {
        fs::write(&probe, vec![0u8; 64 << 10])?;
        let probe_file = DmaFile::open(&probe).await.map_err(os_error)?;
        probe_file.close().await.map_err(os_error)
    }
    .await;
    let _ = fs::remove_file(&probe);
    result.map_err(|e| {
        let why = format!(
            "{} starts with a hole, and the probe file that works around glommio's \
             poll-ring misdetection for sparse files could not be used: {e}",
            path.display()
        );
        open_error(io::Error::new(e.kind(), why))
    })
}

/// The operating system's error inside a glommio error, with its errno intact
/// (`io::Error::from` on glommio's error keeps the kind and message but drops the errno).
fn os_error(e: GlommioError<()>) -> io::Error {
    match e {
        GlommioError::IoError(source) | GlommioError::EnhancedIoError { source, .. } => source,
        other => io::Error::from(other),
    }
}

/// Sets `O_DIRECT` on `fd` if it is not set, then checks that the kernel kept it.
///
/// glommio 0.9 decides from the file system whether to ask for `O_DIRECT`, and skips it on
/// tmpfs; a block device node is on devtmpfs. Reading the flags back is the only proof.
fn ensure_direct_io(fd: i32, path: &Path) -> Result<()> {
    // SAFETY: fcntl(F_GETFL) on an open descriptor; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(Error::io(IoOp::Open, path, 0, io::Error::last_os_error()));
    }
    if flags & libc::O_DIRECT == 0 {
        // SAFETY: fcntl(F_SETFL) with an integer flag word; no memory is passed.
        let rc = unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_DIRECT) };
        if rc < 0 {
            return Err(Error::NoDirectIo { path: path.to_path_buf() });
        }
    }
    // SAFETY: as above.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 || flags & libc::O_DIRECT == 0 {
        return Err(Error::NoDirectIo { path: path.to_path_buf() });
    }
    Ok(())
}

/// Size in bytes and logical block size of a block device, from the kernel.
fn block_device_geometry(fd: i32) -> io::Result<(u64, u64)> {
    const BLKSSZGET: libc::c_ulong = 0x1268;
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    let mut size_bytes: u64 = 0;
    let mut logical_block_size: libc::c_int = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at a live local.
    if unsafe { libc::ioctl(fd, BLKGETSIZE64, &mut size_bytes as *mut u64) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: BLKSSZGET writes one int through the pointer, which points at a live local.
    if unsafe { libc::ioctl(fd, BLKSSZGET, &mut logical_block_size as *mut libc::c_int) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((size_bytes, logical_block_size.max(512) as u64))
}

impl Device for DmaDevice {
    type Buf = DmaBuf;

    fn path(&self) -> &Path {
        &self.path
    }

    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn alignment_bytes(&self) -> u64 {
        self.alignment_bytes
    }

    fn alloc_buf(&self, len: usize) -> DmaBuf {
        self.try_alloc_buf(len)
            .expect("buffers are allocated when the queue is built, before close")
    }

    fn try_alloc_buf(&self, len: usize) -> Option<DmaBuf> {
        let mut buf = self.file().ok()?.alloc_dma_buffer(len);
        buf.as_bytes_mut().fill(0);
        Some(DmaBuf(Rc::new(buf)))
    }

    async fn read_at(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        let len = dst.len();
        check_range(offset, len as u64, self.alignment_bytes, self.size_bytes)?;
        let data = self
            .file()?
            .read_at_aligned(offset, len)
            .await
            .map_err(|e| self.err(IoOp::Read, offset, os_error(e)))?;
        self.whole(IoOp::Read, offset, data.len(), len)?;
        // glommio reads into its own DMA buffer (from its registered arena) and lends it back;
        // the cache's misses take `read_in_place` instead, which has no copy.
        dst.copy_from_slice(&data);
        Ok(())
    }

    async fn read_in_place(&self, offset: u64, mut dst: ReadTarget) -> Result<()> {
        let len = dst.len();
        check_range(offset, len as u64, self.alignment_bytes, self.size_bytes)?;
        if !(dst.as_ptr() as u64).is_multiple_of(self.alignment_bytes) {
            // O_DIRECT needs aligned memory: read into glommio's buffer and copy.
            return self.read_at(offset, dst.as_mut_slice()).await;
        }
        let file = self.file()?;
        let (ptr, len, loan) = dst.into_parts();
        // SAFETY: the memory is valid, aligned for Direct I/O and ours alone while `loan`
        // lives (`ReadTarget::new`'s contract), and glommio drops `loan` only once the kernel
        // is done with it, even if this future is dropped first (its `Source` keeps the loan
        // until the read's completion is reaped), or never if the executor ends before.
        let read = unsafe { file.read_into_at_aligned(offset, ptr, len, loan) }
            .await
            .map_err(|e| self.err(IoOp::Read, offset, os_error(e)))?;
        self.whole(IoOp::Read, offset, read, len)
    }

    async fn write_at(&self, offset: u64, buf: &DmaBuf) -> Result<()> {
        let len = buf.as_bytes().len();
        check_range(offset, len as u64, self.alignment_bytes, self.size_bytes)?;
        let written = self
            .file()?
            .write_rc_at(Rc::clone(&buf.0), offset)
            .await
            .map_err(|e| self.err(IoOp::Write, offset, os_error(e)))?;
        self.whole(IoOp::Write, offset, written, len)
    }

    async fn flush(&self) -> Result<()> {
        self.file()?.fdatasync().await.map_err(|e| self.err(IoOp::Flush, 0, os_error(e)))
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.alignment_bytes, self.size_bytes)?;
        let file = self.file()?;
        if self.is_block_device {
            let range: [u64; 2] = [offset, len];
            const BLKDISCARD: libc::c_ulong = 0x1277;
            // SAFETY: BLKDISCARD reads two u64 through the pointer, which points at a live local.
            let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKDISCARD, range.as_ptr()) };
            if rc < 0 {
                return Err(self.err(IoOp::Discard, offset, io::Error::last_os_error()));
            }
            Ok(())
        } else {
            file.deallocate(offset, len)
                .await
                .map_err(|e| self.err(IoOp::Discard, offset, os_error(e)))
        }
    }
}
