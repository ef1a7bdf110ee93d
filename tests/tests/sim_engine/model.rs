//! The model: what every 512-byte sector of every block may hold, live and after a crash.
//!
//! Live data. A block's writes are serialised by the simulation (one modifier in flight per
//! block, see `claims.rs`), so its live content walks through a sequence of states. Each
//! block keeps that sequence from the oldest state a read in flight may still see:
//! `committed` is the state the block surely holds (every write that returned), and a routed
//! write in flight adds one *pending* state after it, which the owner shard lands at a moment
//! the sender cannot see. A read that starts when `committed` is state `lo` and ends when the
//! newest state is `hi` must see exactly one of the states `lo..=hi`, whole (no mix of two).
//! A state is `None` after the cache dropped data whose write had failed (a forget): the
//! device's version is then unknown among the versions written since the durable floor, and
//! the next read tells which.
//!
//! Durable data. Per sector: the floor (the version the last successful barrier covered) and
//! every version written since, ascending. After a crash a sector must hold one of those.

use std::collections::VecDeque;
use std::ops::Range;

use corebuf_tests::check_sector;

use crate::{BS, SECTORS, STAMP_SECTOR_BYTES};

/// The versions of every sector of a block.
pub type Versions = [u64; SECTORS];

#[derive(Clone, Debug)]
pub struct BlockModel {
    /// Live states, the first at absolute index `base`; `None` = unknown (see the module doc).
    states: VecDeque<Option<Versions>>,
    base: u64,
    /// Absolute index of the state every returned write produced.
    committed: u64,
    /// The `lo` of every read in flight.
    readers: Vec<u64>,
    /// Bumped by every forget of failed data, so a barrier that started before it does not
    /// claim the given-up versions.
    relax_epoch: u64,
    /// The version the last successful barrier made durable, per sector.
    floor: Versions,
    /// Every version written to the sector that is not older than its floor, ascending.
    history: [Vec<u64>; SECTORS],
    next_version: u64,
}

impl BlockModel {
    fn new() -> Self {
        BlockModel {
            states: VecDeque::from([Some([0; SECTORS])]),
            base: 0,
            committed: 0,
            readers: Vec::new(),
            relax_epoch: 0,
            floor: [0; SECTORS],
            history: std::array::from_fn(|_| vec![0]),
            next_version: 1,
        }
    }

    fn allowed(&self, sector: usize, version: u64) -> bool {
        version >= self.floor[sector] && self.history[sector].binary_search(&version).is_ok()
    }

    fn newest(&self) -> u64 {
        self.base + self.states.len() as u64 - 1
    }

    fn state(&self, at: u64) -> Option<Versions> {
        self.states[(at - self.base) as usize]
    }

    fn committed_state(&self) -> Option<Versions> {
        self.state(self.committed)
    }

    /// Drops the states no read in flight can see any more.
    fn prune(&mut self) {
        let keep_from = self.readers.iter().copied().fold(self.committed, u64::min);
        while self.base < keep_from {
            self.states.pop_front();
            self.base += 1;
        }
    }

    /// Pushes a new newest state.
    fn push(&mut self, state: Option<Versions>) {
        self.states.push_back(state);
    }

    fn new_version(&mut self, sectors: Range<usize>) -> u64 {
        let version = self.next_version;
        self.next_version += 1;
        for s in sectors {
            self.history[s].push(version);
        }
        version
    }
}

/// What a barrier started with: for each block whose committed state was known, that state
/// and the relax epoch.
pub type Snapshot = Vec<Option<(Versions, u64)>>;

#[derive(Debug)]
pub struct Model {
    blocks: Vec<BlockModel>,
}

type Check = std::result::Result<(), String>;

fn trace(block: u64, what: std::fmt::Arguments<'_>) {
    thread_local! {
        static TRACED: Option<u64> = std::env::var("SIM_TRACE_BLOCK").ok().map(|v| v.parse().expect("a block"));
    }
    if TRACED.with(|t| *t == Some(block)) {
        eprintln!("trace block {block}: {what}");
    }
}

impl Model {
    pub fn new(device_blocks: u64) -> Self {
        Model { blocks: (0..device_blocks).map(|_| BlockModel::new()).collect() }
    }

    /// A read of `block` starts: returns the oldest state it may see.
    pub fn read_begin(&mut self, block: u64) -> u64 {
        let m = &mut self.blocks[block as usize];
        m.readers.push(m.committed);
        m.committed
    }

    /// The read that started at `lo` saw `data`.
    pub fn read_end(&mut self, block: u64, lo: u64, data: &[u8]) -> Check {
        let m = &mut self.blocks[block as usize];
        let at = m.readers.iter().position(|&r| r == lo).expect("a read in flight is listed");
        m.readers.swap_remove(at);
        let result = self.check_window(block, lo, data);
        self.blocks[block as usize].prune();
        result
    }

    /// The read that started at `lo` failed: it saw nothing.
    pub fn read_cancel(&mut self, block: u64, lo: u64) {
        let m = &mut self.blocks[block as usize];
        let at = m.readers.iter().position(|&r| r == lo).expect("a read in flight is listed");
        m.readers.swap_remove(at);
        m.prune();
    }

    /// Checks data seen at one instant (inside a job on the owner shard).
    pub fn check_now(&mut self, block: u64, data: &[u8]) -> Check {
        let lo = self.blocks[block as usize].committed;
        self.check_window(block, lo, data)
    }

    fn check_window(&mut self, block: u64, lo: u64, data: &[u8]) -> Check {
        let m = &mut self.blocks[block as usize];
        let mut seen = [0u64; SECTORS];
        for (s, sector) in data.chunks_exact(STAMP_SECTOR_BYTES).enumerate() {
            seen[s] = check_sector(sector, block, s as u64)?;
        }
        let hi = m.newest();
        let window: Vec<Option<Versions>> = (lo..=hi).map(|at| m.state(at)).collect();
        if window.contains(&Some(seen)) {
            return Ok(());
        }
        if window.contains(&None) {
            // Unknown: after a forget of failed data the device's version shows through.
            for (s, &version) in seen.iter().enumerate() {
                if !m.allowed(s, version) {
                    return Err(format!(
                        "block {block} sector {s} reads version {version}, never written since \
                         floor {} (history {:?})",
                        m.floor[s], m.history[s]
                    ));
                }
            }
            trace(block, format_args!("read of unknown state sees {seen:?}"));
            if m.committed == hi && m.committed_state().is_none() {
                let at = (m.committed - m.base) as usize;
                m.states[at] = Some(seen);
            }
            return Ok(());
        }
        let expected: Vec<Versions> = window.into_iter().flatten().collect();
        Err(format!(
            "block {block} reads versions {seen:?}, but the states it may hold are {expected:?} \
             (stale, lost, mixed or unknown data)"
        ))
    }

    /// A whole-block write is sent (the owner lands it later): returns its version.
    pub fn write_send(&mut self, block: u64) -> u64 {
        let m = &mut self.blocks[block as usize];
        assert_eq!(m.committed, m.newest(), "one write in flight per block");
        let version = m.new_version(0..SECTORS);
        m.push(Some([version; SECTORS]));
        trace(block, format_args!("write_send v{version}"));
        version
    }

    /// The write sent by [`Model::write_send`] returned: `landed` if it returned `Ok`.
    pub fn write_done(&mut self, block: u64, version: u64, landed: bool) {
        trace(block, format_args!("write_done v{version} landed {landed}"));
        let m = &mut self.blocks[block as usize];
        assert_eq!(m.committed + 1, m.newest(), "the write's state is the newest");
        if landed {
            m.committed += 1;
        } else {
            m.states.pop_back();
            for history in &mut m.history {
                assert_eq!(history.pop(), Some(version), "the failed write's version is last");
            }
        }
        m.prune();
    }

    /// Sectors of a block are rewritten in place, now, on top of its committed state (the
    /// caller checked the bytes it modifies just before): returns the version.
    pub fn modify_now(&mut self, block: u64, sectors: Range<usize>) -> u64 {
        let m = &mut self.blocks[block as usize];
        assert_eq!(m.committed, m.newest(), "no write in flight under a modifier");
        let mut state = m.committed_state().expect("a modified block was read first");
        let version = m.new_version(sectors.clone());
        for s in sectors {
            state[s] = version;
        }
        m.push(Some(state));
        m.committed += 1;
        m.prune();
        trace(block, format_args!("modify_now v{version} -> {state:?}"));
        version
    }

    /// The block's failed data was forgotten: the device's older version is what reads see.
    pub fn relax(&mut self, block: u64) {
        let m = &mut self.blocks[block as usize];
        assert_eq!(m.committed, m.newest(), "no write in flight under a forget");
        m.push(None);
        m.committed += 1;
        m.relax_epoch += 1;
        m.prune();
        trace(block, format_args!("relax"));
    }

    pub fn snapshot(&self, include: impl Fn(u64) -> bool) -> Snapshot {
        let known = |(b, m): (usize, &BlockModel)| {
            let state = m.committed_state().filter(|_| include(b as u64))?;
            Some((state, m.relax_epoch))
        };
        self.blocks.iter().enumerate().map(known).collect()
    }

    /// A barrier that started at `snapshot` succeeded: what it covered is durable.
    pub fn advance_floor(&mut self, snapshot: &Snapshot) {
        for (m, snap) in self.blocks.iter_mut().zip(snapshot) {
            let Some((versions, epoch)) = snap else { continue };
            if *epoch != m.relax_epoch {
                continue;
            }
            for ((&version, floor), history) in
                versions.iter().zip(&mut m.floor).zip(&mut m.history)
            {
                if version > *floor {
                    *floor = version;
                    history.retain(|&v| v >= version);
                }
            }
        }
    }

    /// Checks the image a crash left against the floors and histories, then makes it the new
    /// baseline (no read is in flight any more: the generation is over).
    pub fn recover(&mut self, image: &[u8]) -> Check {
        for (b, m) in self.blocks.iter_mut().enumerate() {
            trace(b as u64, format_args!("recover"));
            let data = &image[b * BS..(b + 1) * BS];
            let mut seen = [0u64; SECTORS];
            for (s, sector) in data.chunks_exact(STAMP_SECTOR_BYTES).enumerate() {
                let version = check_sector(sector, b as u64, s as u64)?;
                if !m.allowed(s, version) {
                    return Err(format!(
                        "after the crash block {b} sector {s} holds version {version}, but the \
                         durable floor is {} and the versions written since are {:?}",
                        m.floor[s], m.history[s]
                    ));
                }
                seen[s] = version;
                m.floor[s] = version;
                m.history[s] = vec![version];
            }
            m.states = VecDeque::from([Some(seen)]);
            m.base = 0;
            m.committed = 0;
            m.readers.clear();
        }
        Ok(())
    }

    /// Checks that `image` holds exactly the committed state of every known block.
    pub fn check_equal(&self, image: &[u8]) -> Check {
        for (b, m) in self.blocks.iter().enumerate() {
            let data = &image[b * BS..(b + 1) * BS];
            let state = m.committed_state();
            for (s, sector) in data.chunks_exact(STAMP_SECTOR_BYTES).enumerate() {
                let version = check_sector(sector, b as u64, s as u64)?;
                let good = match state {
                    Some(state) => version == state[s],
                    None => m.allowed(s, version),
                };
                if !good {
                    return Err(format!(
                        "after the final shutdown block {b} sector {s} is durable at version \
                         {version}, the model's state is {state:?}"
                    ));
                }
            }
        }
        Ok(())
    }
}
