//! Retry delays: doubling from a floor to a cap, each with up to as much
//! again added at random (backon's jitter), so that agents across a fleet
//! that fail together (an API server outage, a kubelet upgrade) spread
//! their retries out instead of retrying in lockstep.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// The delays of one retry loop.
#[derive(Debug)]
pub struct Retry {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    max: Duration,
}

impl Retry {
    /// Steps from `min` doubling to `max`; each delay is its step plus a
    /// random part below the step.
    pub fn new(min: Duration, max: Duration) -> Self {
        let builder = ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Self {
            delays: builder.build(),
            builder,
            max,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(self.max)
    }

    /// After a success: the next failure starts from the floor again.
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_to_the_cap_with_jitter_and_start_over_after_a_reset() {
        let (min, max) = (Duration::from_millis(500), Duration::from_secs(30));
        let mut r = Retry::new(min, max);
        let mut step = min;
        for _ in 0..12 {
            let d = r.next_delay();
            assert!(
                d >= step && d < step * 2,
                "{d:?} outside [{step:?}, {:?})",
                step * 2
            );
            step = (step * 2).min(max);
        }
        r.reset();
        let d = r.next_delay();
        assert!(d >= min && d < min * 2, "{d:?} after a reset");
        // Two loops that fail together do not wait the same.
        let a: Vec<Duration> = {
            let mut r = Retry::new(min, max);
            (0..8).map(|_| r.next_delay()).collect()
        };
        let b: Vec<Duration> = {
            let mut r = Retry::new(min, max);
            (0..8).map(|_| r.next_delay()).collect()
        };
        assert_ne!(a, b, "jitter");
    }
}
