//! Further TUN queues, each served on an OS thread of its own by a stack on a
//! current-thread runtime of its own (the first queue's stack runs wherever the
//! caller runs it, with [`super::run_queue`]). Every stack gets the same
//! [`Shared`]; a [`StopFlag`] stops them all, and is set by any queue thread that
//! ends (its device failed, or it panicked), so that one queue down stops the tunnel.
//!
//! Stage: beside the stack, which it only starts; it must not touch packets.

use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::watch;
use tun2socks_platform::Tun;

use super::{Shared, StackConfig};
use crate::device::{Device, DeviceError};
use crate::upstream::Upstream;

/// Why a queue thread ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The queue's runtime was already taken.
    #[error("queue {queue}: no runtime")]
    NoRuntime {
        /// The queue (counted from 0).
        queue: usize,
    },
    /// The queue's descriptor could not be registered with the runtime.
    #[error("queue {queue}: {error}")]
    Device {
        /// The queue.
        queue: usize,
        /// What failed.
        error: DeviceError,
    },
    /// The queue's device failed while the stack ran.
    #[error("queue {queue}: device failed: {error}")]
    Stack {
        /// The queue.
        queue: usize,
        /// The device's error.
        error: io::Error,
    },
}

/// The runtime of a further queue: current-thread, I/O and time, no signal handling
/// (the caller's runtime has it). Build it before the device opens, so that once the
/// device is up the process holds all its descriptors. Dropping it never blocks, so
/// it may be dropped anywhere, also inside another runtime (where tokio forbids
/// dropping one the ordinary way).
#[derive(Debug)]
pub struct QueueRuntime(Option<tokio::runtime::Runtime>);

impl QueueRuntime {
    /// A new runtime.
    pub fn new() -> io::Result<QueueRuntime> {
        tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map(|runtime| QueueRuntime(Some(runtime)))
    }
}

impl Drop for QueueRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Set once, when the tunnel is to stop; every stack's shutdown future waits for it.
#[derive(Debug, Clone)]
pub struct StopFlag(Arc<watch::Sender<bool>>);

impl Default for StopFlag {
    fn default() -> Self {
        StopFlag(Arc::new(watch::channel(false).0))
    }
}

impl StopFlag {
    /// Sets the flag (again: no effect).
    pub fn set(&self) {
        self.0.send_replace(true);
    }

    /// Resolves once the flag is set.
    pub async fn stopped(&self) {
        let mut rx = self.0.subscribe();
        // An error would mean the sender is gone; it lives in `self`, so it is not.
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

/// Sets the flag when dropped (also while a panic unwinds).
struct SetOnDrop(StopFlag);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.set();
    }
}

/// One further queue of the device and what its stack runs with.
#[derive(Debug)]
pub struct Queue {
    /// The queue's number (1 for the first further queue: 0 is the caller's).
    pub queue: usize,
    /// Its descriptor (from [`Device::open_queues`]).
    pub tun: Tun,
    /// Its runtime.
    pub runtime: QueueRuntime,
    /// The device's MTU.
    pub mtu: u16,
    /// What the first queue's probe got from the kernel (offloads belong to the
    /// device, not to a queue).
    pub offload: crate::offload::Features,
    /// The same for every queue.
    pub config: StackConfig,
    /// The proxy.
    pub upstream: Upstream,
    /// The parts every stack shares.
    pub shared: Arc<Shared>,
    /// Stops every queue.
    pub stop: StopFlag,
}

impl Queue {
    /// Starts the queue's thread: its runtime runs the queue's stack until `stop` is
    /// set; the thread sets `stop` itself when it ends, however it ends.
    pub fn spawn(self) -> io::Result<JoinHandle<Result<(), QueueError>>> {
        std::thread::Builder::new()
            .name(format!("t2s-queue-{}", self.queue))
            .spawn(move || {
                let _stop = SetOnDrop(self.stop.clone());
                self.run()
            })
    }

    fn run(self) -> Result<(), QueueError> {
        let queue = self.queue;
        let runtime = (self.runtime.0.as_ref()).ok_or(QueueError::NoRuntime { queue })?;
        runtime.block_on(async {
            let device = Device::from_queue(self.tun, self.mtu, self.offload)
                .map_err(|error| QueueError::Device { queue, error })?;
            let stop = self.stop;
            let shutdown = async move { stop.stopped().await };
            super::run_queue(
                device,
                self.config,
                self.upstream,
                self.shared,
                queue,
                shutdown,
            )
            .await
            .map(drop)
            .map_err(|error| QueueError::Stack { queue, error })
        })
    }
}
