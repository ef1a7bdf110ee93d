//! A minimal executor for plain threads: drives many futures on the calling thread, polling
//! only those whose waker fired, and parks the thread while none is ready. It is what an async
//! caller outside the engine looks like (a tokio worker thread, say) without depending on one.
//!
//! Before parking it polls its ready list for [`SPIN_BEFORE_PARK`], yielding its core between
//! looks: a busy runtime finds its next wake-up that way, and waking a parked thread costs tens
//! of µs on a VM (the `Client` at one in flight measured 17 µs at p50 before the driver polled
//! first), which would otherwise dominate the latency of one call in flight.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;

/// How long the driver polls for a wake-up before it parks its thread.
pub const SPIN_BEFORE_PARK: std::time::Duration = std::time::Duration::from_micros(50);

/// The futures' shared wake state: who is ready, and the thread to unpark.
struct Ready {
    queue: Mutex<Vec<usize>>,
    /// Set after a push to `queue`: what the driver spins on, so a waker on another thread
    /// never contends for the lock with a spinning driver.
    any: AtomicBool,
    flags: Vec<AtomicBool>,
    thread: Thread,
}

struct IndexWaker {
    ready: Arc<Ready>,
    index: usize,
}

impl Wake for IndexWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.ready.flags[self.index].swap(true, Ordering::AcqRel) {
            self.ready.queue.lock().unwrap_or_else(|e| e.into_inner()).push(self.index);
            self.ready.any.store(true, Ordering::Release);
            self.ready.thread.unpark();
        }
    }
}

/// Runs every future to completion on this thread; returns their outputs in order.
pub fn drive_all<T>(futures: Vec<Pin<Box<dyn Future<Output = T> + '_>>>) -> Vec<T> {
    let count = futures.len();
    let ready = Arc::new(Ready {
        queue: Mutex::new((0..count).collect()),
        any: AtomicBool::new(true),
        flags: (0..count).map(|_| AtomicBool::new(true)).collect(),
        thread: std::thread::current(),
    });
    let wakers: Vec<Waker> = (0..count)
        .map(|index| Waker::from(Arc::new(IndexWaker { ready: Arc::clone(&ready), index })))
        .collect();
    let mut futures: Vec<_> = futures.into_iter().map(Some).collect();
    let mut outputs: Vec<Option<T>> = (0..count).map(|_| None).collect();
    let mut left = count;
    let mut batch = Vec::with_capacity(count);
    while left > 0 {
        ready.any.store(false, Ordering::Release);
        std::mem::swap(&mut batch, &mut *ready.queue.lock().unwrap_or_else(|e| e.into_inner()));
        if batch.is_empty() {
            let since = std::time::Instant::now();
            while !ready.any.load(Ordering::Acquire) {
                if since.elapsed() > SPIN_BEFORE_PARK {
                    // A wake between the check and the park leaves the unpark token: no loss.
                    std::thread::park();
                    break;
                }
                // Yield, not spin: on a machine with as many busy threads as cores (shards and
                // clients), a spinning client would take the core its answer comes from.
                std::thread::yield_now();
            }
            continue;
        }
        for index in batch.drain(..) {
            ready.flags[index].store(false, Ordering::Release);
            let Some(future) = futures[index].as_mut() else { continue };
            let mut cx = Context::from_waker(&wakers[index]);
            if let Poll::Ready(value) = future.as_mut().poll(&mut cx) {
                outputs[index] = Some(value);
                futures[index] = None;
                left -= 1;
            }
        }
    }
    outputs.into_iter().map(|o| o.expect("every future completed")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drives_futures_woken_from_other_threads() {
        let futures: Vec<Pin<Box<dyn Future<Output = u32>>>> = (0..8u32)
            .map(|i| {
                let (tx, rx) = std::sync::mpsc::channel::<()>();
                let flag = Arc::new(AtomicBool::new(false));
                let (f2, w) = (Arc::clone(&flag), Arc::new(Mutex::new(None::<Waker>)));
                let w2 = Arc::clone(&w);
                std::thread::spawn(move || {
                    let _ = rx.recv();
                    f2.store(true, Ordering::SeqCst);
                    if let Some(waker) = w2.lock().unwrap().take() {
                        waker.wake();
                    }
                });
                let mut sent = Some(tx);
                Box::pin(std::future::poll_fn(move |cx| {
                    *w.lock().unwrap() = Some(cx.waker().clone());
                    if let Some(tx) = sent.take() {
                        let _ = tx.send(());
                    }
                    if flag.load(Ordering::SeqCst) {
                        Poll::Ready(i * 2)
                    } else {
                        Poll::Pending
                    }
                })) as Pin<Box<dyn Future<Output = u32>>>
            })
            .collect();
        assert_eq!(drive_all(futures), (0..8).map(|i| i * 2).collect::<Vec<_>>());
    }
}
