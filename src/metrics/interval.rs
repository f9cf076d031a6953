//! `--stats-interval`: the summary line, logged at a fixed period.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::MissedTickBehavior;

use super::Metrics;

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
