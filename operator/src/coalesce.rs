//! Coalescing a stream of triggers: each distinct item at most once per
//! period.

use std::time::Duration;

use futures::StreamExt;

/// How often node events reach the policy controller, at most once per
/// policy each time.
pub const COALESCE_NODE_EVENTS: Duration = Duration::from_millis(500);

/// Forwards what `rx` receives, each distinct item at most once per
/// `every`: a steady stream of the same items comes out as one batch per
/// period, never held back longer than `every`.
pub fn coalesce<T>(
    mut rx: futures::channel::mpsc::UnboundedReceiver<T>,
    every: Duration,
) -> futures::channel::mpsc::UnboundedReceiver<T>
where
    T: std::hash::Hash + Eq + Send + 'static,
{
    let (tx, out) = futures::channel::mpsc::unbounded();
    tokio::spawn(async move {
        let mut pending = std::collections::HashSet::new();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                item = rx.next() => match item {
                    Some(x) => {
                        pending.insert(x);
                    }
                    None => break,
                },
                _ = tick.tick() => {
                    for x in pending.drain() {
                        if tx.unbounded_send(x).is_err() {
                            return;
                        }
                    }
                }
            }
        }
        for x in pending.drain() {
            let _ = tx.unbounded_send(x);
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A steady stream of triggers for the same two keys comes out as one
    /// batch per period: deduplicated, and never held back until the
    /// stream pauses (what a debounce alone does).
    #[tokio::test(start_paused = true)]
    async fn a_steady_stream_is_batched_not_starved() {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let mut out = coalesce(rx, Duration::from_millis(500));
        let feeder = tokio::spawn(async move {
            for i in 0..300u32 {
                tx.unbounded_send(i % 2).unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        let start = tokio::time::Instant::now();
        let mut got = Vec::new();
        while start.elapsed() < Duration::from_millis(2900) {
            if let Ok(Some(x)) = tokio::time::timeout(Duration::from_millis(50), out.next()).await {
                got.push((start.elapsed().as_millis() / 500, x));
            }
        }
        feeder.await.unwrap();
        // Both keys in every period while the stream flowed, once each.
        for period in 1..5 {
            let mut keys: Vec<u32> = got
                .iter()
                .filter(|(p, _)| *p == period)
                .map(|(_, k)| *k)
                .collect();
            keys.sort();
            assert_eq!(keys, [0, 1], "period {period}: {got:?}");
        }
    }
}
