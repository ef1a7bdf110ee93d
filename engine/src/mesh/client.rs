//! Clients' side of the mesh: calls pushed on a shard's ingress queue and answered through
//! a shared call slot.

use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

use concurrent_queue::PushError;
use corebuf_shard::io::Device;

use super::{Mesh, Op, Payload};
use crate::{Error, Result};

/// A client's request on a shard's ingress queue.
pub(super) struct ClientRequest<D: Device + 'static> {
    pub(super) op: Op<D>,
    pub(super) call: Option<Responder>,
}

/// The owner's duty to answer a client call: dropped unanswered (its shard died with the
/// request queued or in a task), it answers `ShardFailed`, so no client waits forever.
pub(super) struct Responder {
    pub(super) call: Arc<ClientCall>,
    pub(super) shard: usize,
    pub(super) answered: bool,
}

impl Responder {
    pub(super) fn answer(mut self, result: Result<Payload>) {
        self.answered = true;
        self.call.complete(result);
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if !self.answered {
            self.call.complete(Err(Error::ShardFailed { shard: self.shard }));
        }
    }
}

/// Where a shard puts a client's answer, and the client's waker.
#[derive(Debug, Default)]
pub(crate) struct ClientCall {
    pub(super) state: Mutex<CallState>,
}

#[derive(Default)]
pub(super) struct CallState {
    pub(super) result: Option<Result<Payload>>,
    /// The block's bytes: the client's data for a write, the answer's for a read.
    pub(super) data: Vec<u8>,
    pub(super) waker: Option<Waker>,
}

impl std::fmt::Debug for CallState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallState").field("done", &self.result.is_some()).finish_non_exhaustive()
    }
}

impl ClientCall {
    pub(super) fn complete(&self, result: Result<Payload>) {
        let waker = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.result = Some(result);
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl<D: Device + 'static> Mesh<D> {
    /// Why shard `to`'s closed ingress refused a call: it died, or the engine is stopping.
    fn refusal(&self, to: usize) -> Error {
        if self.is_dead(to) {
            Error::ShardFailed { shard: to }
        } else {
            Error::ShutDown
        }
    }

    /// Sends a client's request to shard `to`, waiting while its ingress is full.
    pub(super) async fn client_push(&self, to: usize, mut request: ClientRequest<D>) -> Result<()> {
        loop {
            match self.ingress[to].push(request) {
                Ok(()) => {
                    self.doorbells[to].ring();
                    return Ok(());
                }
                Err(PushError::Closed(back)) => {
                    if let Some(mut responder) = back.call {
                        responder.answered = true; // the caller gets the error below instead
                    }
                    return Err(self.refusal(to));
                }
                Err(PushError::Full(back)) => {
                    request = back;
                    let listener = self.ingress_room[to].listen();
                    if !self.ingress[to].is_full() || self.ingress[to].is_closed() {
                        continue;
                    }
                    listener.await;
                }
            }
        }
    }

    /// A client's call to shard `to`: `data` goes with a write and comes back with a read.
    pub(crate) async fn client_call(
        &self,
        to: usize,
        op: Op<D>,
        data: Vec<u8>,
    ) -> Result<(Payload, Vec<u8>)> {
        let call = Arc::new(ClientCall {
            state: Mutex::new(CallState { result: None, data, waker: None }),
        });
        let responder = Responder { call: Arc::clone(&call), shard: to, answered: false };
        self.client_push(to, ClientRequest { op, call: Some(responder) }).await?;
        std::future::poll_fn(|cx| {
            let mut state = call.state.lock().unwrap_or_else(|e| e.into_inner());
            match state.result.take() {
                Some(result) => {
                    let data = std::mem::take(&mut state.data);
                    Poll::Ready(result.map(|payload| (payload, data)))
                }
                None => {
                    if !state.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        state.waker = Some(cx.waker().clone());
                    }
                    Poll::Pending
                }
            }
        })
        .await
    }

    /// A client's prefetch: sent if shard `to`'s ingress has room now, else skipped.
    pub(crate) fn client_prefetch(&self, to: usize, block: u64, count: u64) -> Result<()> {
        // A longer span is cut short, as prefetch may skip.
        let count = u32::try_from(count).unwrap_or(u32::MAX);
        match self.ingress[to].push(ClientRequest { op: Op::Prefetch { block, count }, call: None })
        {
            Ok(()) => {
                self.doorbells[to].ring();
                Ok(())
            }
            Err(PushError::Closed(_)) => Err(self.refusal(to)),
            Err(PushError::Full(_)) => Ok(()),
        }
    }
}
