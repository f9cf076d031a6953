//! Running beside a tunnel: `--stats-interval`'s summary line at a fixed period and
//! on SIGUSR1, and the metrics endpoint.

use std::future::Future;
use std::io;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::{Metrics, http};

/// Logs the summary line of `metrics` at info level every `period` until `shutdown`
/// resolves. A zero `period` logs nothing and returns at once.
pub async fn log_every(
    metrics: Arc<Metrics>,
    period: Duration,
    shutdown: impl Future<Output = ()>,
) {
    if period.is_zero() {
        return;
    }
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut shutdown = pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            _ = ticks.tick() => tracing::info!(stats = %metrics.snapshot(), "stats"),
        }
    }
}

/// Logs the summary line of `metrics` at info level on each SIGUSR1 or SIGUSR2 until
/// `shutdown` resolves (`kill -USR1 PID`: the counters now, without
/// `--stats-interval` or the endpoint). If the handlers cannot be installed, logs
/// that once and waits.
pub async fn log_on_signal(metrics: Arc<Metrics>, shutdown: impl Future<Output = ()>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut shutdown = pin!(shutdown);
    let (mut usr1, mut usr2) = match (
        signal(SignalKind::user_defined1()),
        signal(SignalKind::user_defined2()),
    ) {
        (Ok(usr1), Ok(usr2)) => (usr1, usr2),
        (Err(error), _) | (_, Err(error)) => {
            tracing::warn!(%error, "cannot handle SIGUSR1 and SIGUSR2; the stats line is not logged on them");
            return shutdown.await;
        }
    };
    loop {
        let which = tokio::select! {
            () = &mut shutdown => return,
            got = usr1.recv() => got.map(|()| "stats (SIGUSR1)"),
            got = usr2.recv() => got.map(|()| "stats (SIGUSR2)"),
        };
        match which {
            Some(message) => tracing::info!(stats = %metrics.snapshot(), "{message}"),
            None => return shutdown.await,
        }
    }
}

/// The stats line and the metrics endpoint, running as tasks beside a tunnel until
/// [`Observers::stop`].
#[derive(Debug)]
pub struct Observers {
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

impl Observers {
    /// Starts logging every `interval` (zero: never) and, given a listener (from
    /// [`http::bind`]), serving `GET /metrics` on it. Needs a tokio runtime.
    pub fn start(
        metrics: &Arc<Metrics>,
        interval: Duration,
        listener: Option<std::net::TcpListener>,
    ) -> io::Result<Observers> {
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let log = log_every(metrics.clone(), interval, stop.clone().cancelled_owned());
        tasks.spawn(log);
        tasks.spawn(log_on_signal(
            metrics.clone(),
            stop.clone().cancelled_owned(),
        ));
        if let Some(listener) = listener {
            let addr = listener.local_addr()?;
            let listener = tokio::net::TcpListener::from_std(listener)?;
            tracing::info!("metrics at http://{addr}/metrics");
            let served = http::serve(listener, metrics.clone(), stop.clone().cancelled_owned());
            tasks.spawn(async move {
                if let Err(e) = served.await {
                    tracing::warn!(error = %e, "metrics endpoint stopped");
                }
            });
        }
        Ok(Observers { stop, tasks })
    }

    /// Stops both and waits for them.
    pub async fn stop(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}
