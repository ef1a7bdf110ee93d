//! Group commit for `NBD_CMD_FLUSH` and FUA on one shard: callers that arrive while a global
//! barrier runs share the next one instead of each starting their own, and a flush that no
//! write-like reply preceded since a barrier began shares that barrier.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicU64, Ordering};

use corebuf::{Error, Result, Shard};
use corebuf_shard::WaitList;

/// Coalesces barriers requested on one shard.
///
/// A flush must cover every write replied to before it arrived (on any connection: the
/// export is multi-conn). Two rules give that, with `replied` the count of write-like replies
/// of the whole server, read when the flush arrives (its *mark*):
/// 1. A barrier that **started after the flush arrived** covers it (the engine's barrier
///    covers every write that returned before the barrier began).
/// 2. A barrier that started when `replied` already equalled the flush's mark covers it too:
///    no write was replied to between that barrier's start and the flush's arrival, so every
///    write the flush must cover was dirtied before the barrier began.
///
/// Each write is counted after it is cached dirty and before its reply can leave (and before
/// its own FUA flush reads the count), so a count a flush reads includes every write whose
/// reply the client could have seen, and a FUA write's own data.
#[derive(Debug, Default)]
pub struct Flusher {
    /// Barriers started by this flusher (the number of the latest).
    started: Cell<u64>,
    /// The `replied` count when the running barrier started.
    running_mark: Cell<u64>,
    /// The number of the latest barrier that finished, its mark and its error.
    finished: Cell<u64>,
    finished_mark: Cell<u64>,
    last_error: RefCell<Option<Error>>,
    running: Cell<bool>,
    done: WaitList,
}

/// Clears `running` even if the barrier's future is dropped halfway.
struct Running<'a>(&'a Flusher);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.set(false);
        self.0.done.notify_all();
    }
}

impl Flusher {
    /// Returns once a global barrier that covers every write replied to before this call
    /// (`replied` counts them, server-wide) has finished, with its result. Barriers run one
    /// at a time per shard; waiting callers share them.
    pub async fn flush(&self, shard: &Shard, replied: &AtomicU64) -> Result<()> {
        let mark = replied.load(Ordering::SeqCst);
        let needed = self.started.get() + 1;
        loop {
            let finished = self.finished.get();
            if finished >= needed || (finished > 0 && self.finished_mark.get() == mark) {
                return self.last_error.borrow().clone().map_or(Ok(()), Err);
            }
            if !self.running.get() {
                self.running.set(true);
                let running = Running(self);
                let number = self.started.get() + 1;
                self.started.set(number);
                // Read before the barrier starts: if you move this after the flush begins,
                // rule 2 no longer holds.
                let barrier_mark = replied.load(Ordering::SeqCst);
                self.running_mark.set(barrier_mark);
                let result = shard.flush().await;
                *self.last_error.borrow_mut() = result.as_ref().err().cloned();
                self.finished.set(number);
                self.finished_mark.set(barrier_mark);
                drop(running);
                return result;
            }
            let running = self.started.get();
            self.done.wait_for(|| (self.finished.get() >= running).then_some(())).await;
        }
    }
}
