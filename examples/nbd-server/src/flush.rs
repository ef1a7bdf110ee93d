//! Group commit for `NBD_CMD_FLUSH` and FUA on one shard: callers that arrive while a global
//! barrier runs share the next one instead of each starting their own.

use std::cell::{Cell, RefCell};

use corebuf::{Error, Result, Shard};
use corebuf_shard::WaitList;

/// Coalesces barriers requested on one shard.
///
/// Invariant: a caller returns the result of a barrier that **started after the caller
/// arrived**, so everything replied to before the call is covered (the engine's barrier
/// covers every write that returned before the barrier began).
#[derive(Debug, Default)]
pub struct Flusher {
    /// Barriers started by this flusher (the number of the latest).
    started: Cell<u64>,
    /// The number of the latest barrier that finished, and its error.
    finished: Cell<u64>,
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
    /// Returns once a global barrier that started after this call has finished, with its
    /// result. Barriers run one at a time per shard; waiting callers share the next one.
    pub async fn flush(&self, shard: &Shard) -> Result<()> {
        let needed = self.started.get() + 1;
        loop {
            if self.finished.get() >= needed {
                return self.last_error.borrow().clone().map_or(Ok(()), Err);
            }
            if !self.running.get() {
                self.running.set(true);
                let running = Running(self);
                let number = self.started.get() + 1;
                self.started.set(number);
                let result = shard.flush().await;
                *self.last_error.borrow_mut() = result.as_ref().err().cloned();
                self.finished.set(number);
                drop(running);
                return result;
            }
            self.done
                .wait_for(|| (!self.running.get() || self.finished.get() >= needed).then_some(()))
                .await;
        }
    }
}
