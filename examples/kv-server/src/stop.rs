//! A one-shot stop signal that any number of tasks can wait on, each waiter deregistering
//! itself when its future is dropped (a connection waits on it at every read, so stale
//! registrations from finished connections must not pile up, as they would in a plain list of
//! wakers that is only emptied when notified).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use hashbrown::HashMap;

/// Set once; wakes every waiter.
#[derive(Debug, Default)]
pub struct StopSignal {
    stopped: Cell<bool>,
    next: Cell<u64>,
    waiters: RefCell<HashMap<u64, Waker>>,
}

impl StopSignal {
    /// Whether the signal was raised.
    pub fn is_set(&self) -> bool {
        self.stopped.get()
    }

    /// Raises the signal and wakes every waiter.
    pub fn set(&self) {
        self.stopped.set(true);
        let waiters: Vec<Waker> = self.waiters.borrow_mut().drain().map(|(_, w)| w).collect();
        for w in waiters {
            w.wake();
        }
    }

    /// Resolves once the signal is raised.
    pub fn wait(&self) -> StopWait<'_> {
        StopWait { signal: self, key: None }
    }

    /// Registered waiters (for tests).
    #[cfg(test)]
    fn waiters(&self) -> usize {
        self.waiters.borrow().len()
    }
}

/// The future of [`StopSignal::wait`].
#[derive(Debug)]
pub struct StopWait<'a> {
    signal: &'a StopSignal,
    key: Option<u64>,
}

impl Future for StopWait<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.signal.stopped.get() {
            return Poll::Ready(());
        }
        let key = match self.key {
            Some(k) => k,
            None => {
                let k = self.signal.next.get();
                self.signal.next.set(k + 1);
                self.key = Some(k);
                k
            }
        };
        self.signal.waiters.borrow_mut().insert(key, cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for StopWait<'_> {
    fn drop(&mut self) {
        if let Some(k) = self.key {
            self.signal.waiters.borrow_mut().remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_waiters_deregister_and_set_wakes_the_rest() {
        glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                let signal = std::rc::Rc::new(StopSignal::default());
                for _ in 0..100 {
                    // A waiter that loses a race (like a read that completes first) goes away.
                    let lost = futures_lite::future::or(
                        async {
                            signal.wait().await;
                            1
                        },
                        async { 2 },
                    )
                    .await;
                    assert_eq!(lost, 2);
                }
                assert_eq!(signal.waiters(), 0);
                let s2 = std::rc::Rc::clone(&signal);
                let waiter = glommio::spawn_local(async move { s2.wait().await });
                futures_lite::future::yield_now().await;
                assert_eq!(signal.waiters(), 1);
                signal.set();
                waiter.await;
                assert!(signal.is_set());
                signal.wait().await;
            })
            .expect("spawn executor")
            .join()
            .expect("join executor");
    }
}
