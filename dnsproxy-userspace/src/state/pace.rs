//! When the name table is built after a change. A change after a quiet spell is built
//! [`TABLE_SETTLE`] after the last build at the latest, so a burst settles into one
//! build. While changes keep coming (a rollout behind a `workloadSelector`, pods
//! flipping readiness), each build that follows the last one closely doubles the wait,
//! up to [`TABLE_SETTLE_MAX`]: a table whose every build reads each selected Pod then
//! costs a bounded share of a core whatever the churn, and a backend change still
//! lands within a second, as kube-proxy's `minSyncPeriod` does. The first quiet spell
//! brings the wait back down.
use std::time::Duration;

use tokio::time::Instant;

/// Shortest time between two builds of the name table.
pub(super) const TABLE_SETTLE: Duration = Duration::from_millis(100);

/// Longest, under sustained churn.
pub(super) const TABLE_SETTLE_MAX: Duration = Duration::from_secs(1);

/// The last build, and the wait before the next.
#[derive(Debug)]
pub(super) struct Pace {
    last: Option<Instant>,
    settle: Duration,
}

impl Default for Pace {
    fn default() -> Self {
        Pace {
            last: None,
            settle: TABLE_SETTLE,
        }
    }
}

impl Pace {
    /// When a change that is waiting may be built: at once if nothing was built yet.
    pub(super) fn due(&self) -> Instant {
        self.last.map_or_else(Instant::now, |at| at + self.settle)
    }

    /// A build at `now`: one that follows the last within twice the wait means changes
    /// keep coming (double the wait); a later one, a quiet spell (back to the shortest).
    pub(super) fn built(&mut self, now: Instant) {
        let busy = self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < self.settle * 2);
        self.settle = if busy {
            (self.settle * 2).min(TABLE_SETTLE_MAX)
        } else {
            TABLE_SETTLE
        };
        self.last = Some(now);
    }

    /// The wait now.
    #[cfg(test)]
    fn settle(&self) -> Duration {
        self.settle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds as the loop makes them when a change arrives every `gap`: each as soon as
    /// it is due. Returns the build times, from 0.
    fn builds(pace: &mut Pace, start: Instant, gap: Duration, until: Duration) -> Vec<Duration> {
        let mut at = Vec::new();
        let mut change = start;
        while change < start + until {
            let when = pace.due().max(change);
            pace.built(when);
            at.push(when.saturating_duration_since(start));
            // The next change after this build.
            while change <= when {
                change += gap;
            }
        }
        at
    }

    #[test]
    fn sustained_churn_spaces_builds_out_to_one_a_second() {
        let start = Instant::now();
        let mut pace = Pace::default();
        pace.built(start);
        // 50 changes a second for 10 s.
        let at = builds(
            &mut pace,
            start,
            Duration::from_millis(20),
            Duration::from_secs(10),
        );
        assert_eq!(pace.settle(), TABLE_SETTLE_MAX);
        assert!(at.len() <= 14, "{} builds: {at:?}", at.len());
        // Never more than a second between two builds while changes come.
        let most = TABLE_SETTLE_MAX + Duration::from_millis(20);
        assert!(
            at.windows(2).all(|w| w[1].saturating_sub(w[0]) <= most),
            "{at:?}"
        );
    }

    #[test]
    fn a_change_after_a_quiet_spell_is_built_within_the_shortest_wait() {
        let start = Instant::now();
        let mut pace = Pace::default();
        pace.built(start);
        builds(
            &mut pace,
            start,
            Duration::from_millis(20),
            Duration::from_secs(5),
        );
        assert_eq!(pace.settle(), TABLE_SETTLE_MAX);
        // Quiet for 3 s, then one change: built at once, and the wait is short again.
        let later = start + Duration::from_secs(8);
        assert!(pace.due() <= later);
        pace.built(later);
        assert_eq!(pace.settle(), TABLE_SETTLE);
        assert_eq!(pace.due(), later + TABLE_SETTLE);
    }
}
