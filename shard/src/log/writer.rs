//! The log's writer side: the task that writes full blocks behind the appends, commit
//! rounds, flushes and header writes (methods of the log's shared state).

use std::rc::Rc;
use std::time::Instant;

use super::*;
use crate::io::Device;
use crate::log::error::LogError;
use crate::log::format::{
    encode_record_header, RecordHeader, RegionHeader, HEADER_BLOCKS, RECORD_HEADER_BYTES,
};

impl<D: Device + 'static> Inner<D> {
    pub(super) fn data_bytes(&self) -> u64 {
        self.data_blocks * self.block_bytes
    }

    pub(super) fn staging_bytes(&self) -> u64 {
        self.config.staging_blocks as u64 * self.block_bytes
    }

    /// Whether `need` more bytes leave every block the writer will write clear of live data:
    /// the block holding the new end must not be the block of `start` one lap earlier.
    pub(super) fn log_room(&self, s: &State, need: u64) -> bool {
        let bs = self.block_bytes;
        let end_block = (s.head + need).next_multiple_of(bs);
        end_block <= s.start - s.start % bs + self.data_bytes()
    }

    /// `Ok(true)` if a record of `need` bytes can be appended now, `Ok(false)` if it must wait
    /// for the writer, an error if it never can.
    pub(super) fn fits_staging(&self, need: u64) -> Result<bool, LogError> {
        let s = self.state.borrow();
        if let Some(e) = &s.failed {
            return Err(LogError::Failed(e.clone()));
        }
        if s.closing || !s.writer_running {
            return Err(LogError::Closed);
        }
        if !self.log_room(&s, need) {
            let bs = self.block_bytes;
            let limit = s.start - s.start % bs + self.data_bytes();
            let free = limit.saturating_sub(s.head.next_multiple_of(bs));
            return Err(LogError::Full { needed: need, free });
        }
        Ok(s.head + need <= s.submitted + self.staging_bytes())
    }

    /// Writes the record into the staging ring and moves the head (no await: atomic for every
    /// other task).
    pub(super) fn append_now(&self, payload: &[u8], need: u64) -> u64 {
        let (lsn, durable, epoch) = {
            let s = self.state.borrow();
            (s.head, s.durable, s.header.epoch as u32)
        };
        let header = RecordHeader { len: payload.len() as u32, lsn, durable_lsn: durable, epoch };
        let bytes = encode_record_header(&header, payload);
        self.stage(lsn, &bytes);
        self.stage(lsn + RECORD_HEADER_BYTES as u64, payload);
        let end = lsn + need;
        let crossed = {
            let mut s = self.state.borrow_mut();
            s.head = end;
            end / self.block_bytes != lsn / self.block_bytes
        };
        {
            let mut stats = self.stats.borrow_mut();
            stats.appends += 1;
            stats.appended_bytes += need;
        }
        // The writer only needs waking when a block filled (write-behind); commits wake it
        // themselves.
        if crossed {
            self.changed.notify_all();
        }
        end
    }

    /// Copies `bytes` into the staging ring at stream position `lsn`.
    pub(super) fn stage(&self, lsn: u64, bytes: &[u8]) {
        let ring = self.staging_bytes();
        let mut staging = self.staging.borrow_mut();
        let mut at = (lsn % ring) as usize;
        let mut rest = bytes;
        while !rest.is_empty() {
            let n = rest.len().min(staging.len() - at);
            staging[at..at + n].copy_from_slice(&rest[..n]);
            rest = &rest[n..];
            at = 0;
        }
    }

    /// The device block holding stream position `lsn`.
    pub(super) fn device_block(&self, lsn: u64) -> u64 {
        self.config.region_first_block + HEADER_BLOCKS + (lsn / self.block_bytes) % self.data_blocks
    }

    pub(super) async fn run_writer(self: Rc<Self>) {
        loop {
            let work = self
                .changed
                .wait_for(|| {
                    let s = self.state.borrow();
                    if s.failed.is_some() {
                        Some(false)
                    } else if s.submitted + self.block_bytes <= s.head || s.wanted > s.written {
                        Some(true)
                    } else if s.closing {
                        Some(false)
                    } else {
                        None
                    }
                })
                .await;
            if !work {
                break;
            }
            if let Err(e) = self.write_round().await {
                self.fail(e);
                break;
            }
        }
        // A flush still in flight settles its commit before the writer is gone.
        self.changed.wait_for(|| (!self.state.borrow().flushing).then_some(())).await;
        self.state.borrow_mut().writer_running = false;
        self.changed.notify_all();
    }

    /// Latches the first error: the log is failed from now on (invariant 5).
    pub(super) fn fail(&self, e: crate::Error) {
        self.state.borrow_mut().failed.get_or_insert(e);
        self.changed.notify_all();
    }

    /// Hands every full block to the queue (write-behind); if a commit is wanted, also the
    /// partial tail block; waits for those writes, then starts the flush that completes the
    /// commit and returns without waiting for it. So the next round's writes overlap this
    /// round's flush, and rounds follow each other at the pace of the slower of the two; each
    /// flush still follows the completion of every write its commit covers (invariant 4), and
    /// flushes run one at a time, in order.
    pub(super) async fn write_round(self: &Rc<Self>) -> Result<(), crate::Error> {
        let bs = self.block_bytes;
        let mut target = None;
        let started = Instant::now();
        loop {
            let mut request = self.queue.request().await;
            // Look at the state only after the await: appends may have run meanwhile.
            let (at, full) = {
                let mut s = self.state.borrow_mut();
                if s.submitted + bs <= s.head {
                    (s.submitted, true)
                } else if target.is_none() && s.wanted > s.written {
                    target = Some(s.head);
                    s.written = s.head;
                    if s.head == s.submitted {
                        continue; // the tail block is empty: the full blocks cover the commit
                    }
                    (s.submitted, false)
                } else {
                    break;
                }
            };
            let slot = ((at % self.staging_bytes()) / bs * bs) as usize;
            {
                let mut staging = self.staging.borrow_mut();
                request.data_mut().copy_from_slice(&staging[slot..slot + bs as usize]);
                if full {
                    // The slot is reused for a block one ring later: zero it (invariant 2).
                    staging[slot..slot + bs as usize].fill(0);
                }
            }
            {
                let mut s = self.state.borrow_mut();
                s.writes_in_flight += 1;
                if full {
                    s.submitted += bs;
                }
            }
            self.changed.notify_all(); // staging room for waiting appends
            self.stats.borrow_mut().block_writes += 1;
            let me = Rc::clone(self);
            let done = move |result: crate::Result<()>| {
                me.state.borrow_mut().writes_in_flight -= 1;
                if let Err(e) = result {
                    me.fail(e);
                }
                me.changed.notify_all();
            };
            self.queue.write_back_then(request, self.device_block(at), Some(done)).await?;
        }
        let Some(target) = target else { return Ok(()) };
        let ready = || {
            let s = self.state.borrow();
            (s.failed.is_some() || (s.writes_in_flight == 0 && !s.flushing)).then_some(())
        };
        self.changed.wait_for(ready).await;
        if let Some(e) = self.state.borrow().failed.clone() {
            return Err(e);
        }
        self.state.borrow_mut().flushing = true;
        let me = Rc::clone(self);
        glommio::spawn_local(async move {
            let flush_started = Instant::now();
            let flushed = me.queue.flush().await;
            {
                let mut s = me.state.borrow_mut();
                s.flushing = false;
                if flushed.is_ok() {
                    s.durable = s.durable.max(target);
                }
            }
            match flushed {
                Ok(()) => {
                    let mut stats = me.stats.borrow_mut();
                    stats.commits += 1;
                    stats.commit_us_total += started.elapsed().as_micros() as u64;
                    stats.flush_us_total += flush_started.elapsed().as_micros() as u64;
                }
                Err(e) => me.fail(e),
            }
            me.changed.notify_all();
        })
        .detach();
        Ok(())
    }

    pub(super) async fn move_start(&self, lsn: u64, clean: bool) -> Result<(), LogError> {
        self.changed.wait_for(|| (!self.state.borrow().header_busy).then_some(())).await;
        let header = {
            let mut s = self.state.borrow_mut();
            if let Some(e) = &s.failed {
                return Err(LogError::Failed(e.clone()));
            }
            s.header_busy = true;
            RegionHeader {
                sequence: s.header.sequence + 1,
                start_lsn: lsn.clamp(s.start, s.head),
                clean,
                ..s.header
            }
        };
        let written = self.write_header(&header).await;
        {
            let mut s = self.state.borrow_mut();
            s.header_busy = false;
            match &written {
                Ok(()) => {
                    s.start = s.start.max(header.start_lsn);
                    s.header = header;
                }
                Err(LogError::Io(e)) => s.failed = Some(e.clone()),
                Err(_) => {}
            }
        }
        if written.is_ok() {
            self.stats.borrow_mut().start_moves += 1;
        }
        self.changed.notify_all();
        written
    }

    /// Writes `header` into its copy (`sequence % 2`) and flushes.
    pub(super) async fn write_header(&self, header: &RegionHeader) -> Result<(), LogError> {
        let mut request = self.queue.request().await;
        header.encode_into(request.data_mut());
        let block = self.config.region_first_block + header.sequence % 2;
        self.queue.write(&request, block).await?;
        drop(request);
        self.queue.flush().await?;
        Ok(())
    }
}
