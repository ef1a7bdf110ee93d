//! The simulated device: in memory, deterministic, crash-modelling and fault-injecting.
//! For tests only; production I/O goes through [`DmaDevice`](super::DmaDevice).
//!
//! Three invariants:
//! 1. `live` is what a read returns: every completed write and discard, in completion order.
//! 2. `durable` holds exactly the writes that completed before the last successful flush.
//! 3. `unflushed` lists, in completion order, every write completed after that flush; a crash
//!    keeps a seeded subset of them, each possibly torn at 512-byte sector granularity.

use std::cell::RefCell;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use super::device::{check_range, Device, IoBuf};
use crate::error::{Error, IoOp, Result};
use crate::rng::SimRng;

/// The torn-write granularity of the simulated device, in bytes.
pub const SECTOR_BYTES: usize = 512;

/// What the simulated device looks like and which faults it injects.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// Device size in bytes; a multiple of `alignment_bytes`.
    pub size_bytes: u64,
    /// Logical block size in bytes (512 unless a test wants otherwise).
    pub alignment_bytes: u64,
    /// Seeds every random decision the device makes.
    pub seed: u64,
    /// Probability that a read fails with `EIO`.
    pub read_error_probability: f64,
    /// Probability that a write fails with `EIO` (nothing of it reaches the medium).
    pub write_error_probability: f64,
    /// Probability that a flush fails with `EIO` (nothing becomes durable).
    pub flush_error_probability: f64,
    /// Each operation yields to the executor a seeded number of times in `0..=latency_yields_max`
    /// before it completes: deterministic latency that lets operations overlap and reorder.
    pub latency_yields_max: u32,
}

impl SimOptions {
    /// A fault-free device of `size_bytes` with 512-byte sectors.
    pub fn new(size_bytes: u64) -> Self {
        SimOptions {
            size_bytes,
            alignment_bytes: SECTOR_BYTES as u64,
            seed: 0,
            read_error_probability: 0.0,
            write_error_probability: 0.0,
            flush_error_probability: 0.0,
            latency_yields_max: 0,
        }
    }
}

/// Counters of what the simulated device saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimCounters {
    /// Reads completed (successfully or not).
    pub reads: u64,
    /// Writes completed (successfully or not).
    pub writes: u64,
    /// Flushes completed (successfully or not).
    pub flushes: u64,
    /// Discards completed.
    pub discards: u64,
    /// Faults injected, of every kind.
    pub faults_injected: u64,
    /// Most writes ever in flight at once.
    pub writes_in_flight_peak: u64,
    /// Times two writes overlapping the same bytes were in flight at once (should stay 0
    /// behind an I/O queue).
    pub overlapping_writes: u64,
}

/// A plain heap buffer for the simulated device.
#[derive(Debug)]
pub struct SimBuf(Box<[u8]>);

impl IoBuf for SimBuf {
    fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn as_bytes_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

#[derive(Debug)]
struct SimState {
    options: SimOptions,
    rng: SimRng,
    live: Vec<u8>,
    durable: Vec<u8>,
    unflushed: Vec<(u64, Box<[u8]>)>,
    writes_in_flight: Vec<(u64, u64)>,
    counters: SimCounters,
}

/// An in-memory device with a volatile write cache, for tests. Clones share one device, so a
/// test can keep a handle to inspect it or crash it while a queue owns another.
#[derive(Clone, Debug)]
pub struct SimDevice {
    state: Rc<RefCell<SimState>>,
    path: PathBuf,
}

impl SimDevice {
    /// A zeroed device.
    pub fn new(options: SimOptions) -> Self {
        let image = vec![0u8; options.size_bytes as usize];
        Self::from_image(image, options)
    }

    /// A device whose durable and live contents are `image` (after a simulated crash, say).
    /// `options.size_bytes` is taken from the image.
    pub fn from_image(image: Vec<u8>, mut options: SimOptions) -> Self {
        options.size_bytes = image.len() as u64;
        assert!(
            options.size_bytes.is_multiple_of(options.alignment_bytes),
            "a SimDevice's size must be a multiple of its alignment"
        );
        let state = SimState {
            rng: SimRng::new(options.seed),
            options,
            durable: image.clone(),
            live: image,
            unflushed: Vec::new(),
            writes_in_flight: Vec::new(),
            counters: SimCounters::default(),
        };
        SimDevice { state: Rc::new(RefCell::new(state)), path: PathBuf::from("<sim>") }
    }

    /// Simulates a power loss: returns the bytes the medium holds afterwards. Every write that
    /// completed before the last successful flush is kept; of the later ones, a subset chosen by
    /// `seed` is kept, in completion order, and some of those are torn (only some of their
    /// 512-byte sectors land). The device itself is left as it was.
    pub fn crash(&self, seed: u64) -> Vec<u8> {
        let state = self.state.borrow();
        let mut rng = SimRng::new(seed);
        let mut image = state.durable.clone();
        for (offset, data) in &state.unflushed {
            if !rng.chance(0.5) {
                continue;
            }
            let torn = rng.chance(0.25);
            for (i, sector) in data.chunks(SECTOR_BYTES).enumerate() {
                if torn && rng.chance(0.5) {
                    continue;
                }
                let at = *offset as usize + i * SECTOR_BYTES;
                image[at..at + sector.len()].copy_from_slice(sector);
            }
        }
        image
    }

    /// What a read would return now (every completed write, flushed or not).
    pub fn live_image(&self) -> Vec<u8> {
        self.state.borrow().live.clone()
    }

    /// What survives a crash for certain: the writes completed before the last good flush.
    pub fn durable_image(&self) -> Vec<u8> {
        self.state.borrow().durable.clone()
    }

    /// The device's counters.
    pub fn counters(&self) -> SimCounters {
        self.state.borrow().counters.clone()
    }

    /// Changes the fault probabilities from now on (a test can heal a device, say).
    pub fn set_faults(&self, read: f64, write: f64, flush: f64) {
        let mut state = self.state.borrow_mut();
        state.options.read_error_probability = read;
        state.options.write_error_probability = write;
        state.options.flush_error_probability = flush;
    }

    async fn latency(&self) {
        let yields = {
            let mut state = self.state.borrow_mut();
            let max = state.options.latency_yields_max as u64;
            if max == 0 {
                0
            } else {
                state.rng.below(max + 1)
            }
        };
        for _ in 0..yields {
            futures_lite::future::yield_now().await;
        }
    }

    /// Draws whether this operation fails; counts an injected fault.
    fn inject(&self, op: IoOp, offset: u64) -> Result<()> {
        let mut state = self.state.borrow_mut();
        let p = match op {
            IoOp::Read => state.options.read_error_probability,
            IoOp::Write => state.options.write_error_probability,
            IoOp::Flush => state.options.flush_error_probability,
            _ => 0.0,
        };
        if state.rng.chance(p) {
            state.counters.faults_injected += 1;
            let source = io::Error::other(format!("injected {op} fault"));
            return Err(Error::io(op, &self.path, offset, source));
        }
        Ok(())
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        let state = self.state.borrow();
        check_range(offset, len, state.options.alignment_bytes, state.options.size_bytes)
    }
}

impl Device for SimDevice {
    type Buf = SimBuf;

    fn path(&self) -> &Path {
        &self.path
    }

    fn size_bytes(&self) -> u64 {
        self.state.borrow().options.size_bytes
    }

    fn alignment_bytes(&self) -> u64 {
        self.state.borrow().options.alignment_bytes
    }

    fn alloc_buf(&self, len: usize) -> SimBuf {
        SimBuf(vec![0u8; len].into_boxed_slice())
    }

    async fn read_at(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        let len = dst.len();
        self.check(offset, len as u64)?;
        self.latency().await;
        self.state.borrow_mut().counters.reads += 1;
        self.inject(IoOp::Read, offset)?;
        let state = self.state.borrow();
        dst.copy_from_slice(&state.live[offset as usize..offset as usize + len]);
        Ok(())
    }

    async fn write_at(&self, offset: u64, buf: &SimBuf) -> Result<()> {
        let len = buf.0.len() as u64;
        self.check(offset, len)?;
        // Snapshot at submission, as a DMA controller would read the buffer.
        let data: Box<[u8]> = buf.0.clone();
        {
            let mut state = self.state.borrow_mut();
            let overlaps =
                state.writes_in_flight.iter().any(|&(o, l)| o < offset + len && offset < o + l);
            if overlaps {
                state.counters.overlapping_writes += 1;
            }
            state.writes_in_flight.push((offset, len));
            let in_flight = state.writes_in_flight.len() as u64;
            state.counters.writes_in_flight_peak =
                state.counters.writes_in_flight_peak.max(in_flight);
        }
        self.latency().await;
        let result = self.inject(IoOp::Write, offset);
        let mut state = self.state.borrow_mut();
        state.counters.writes += 1;
        let at = state
            .writes_in_flight
            .iter()
            .position(|&entry| entry == (offset, len))
            .expect("a write in flight is listed until it completes");
        state.writes_in_flight.swap_remove(at);
        result?;
        state.live[offset as usize..(offset + len) as usize].copy_from_slice(&data);
        state.unflushed.push((offset, data));
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        self.latency().await;
        self.state.borrow_mut().counters.flushes += 1;
        self.inject(IoOp::Flush, 0)?;
        let mut state = self.state.borrow_mut();
        let state = &mut *state;
        for (offset, data) in state.unflushed.drain(..) {
            let at = offset as usize;
            state.durable[at..at + data.len()].copy_from_slice(&data);
        }
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len)?;
        self.latency().await;
        let mut state = self.state.borrow_mut();
        state.counters.discards += 1;
        state.live[offset as usize..(offset + len) as usize].fill(0);
        state.unflushed.push((offset, vec![0u8; len as usize].into_boxed_slice()));
        Ok(())
    }
}
