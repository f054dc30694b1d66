//! Restart intensity: the pure decision behind one-for-one restarts. A child may fail at most
//! `max_restarts` times within `window_ms`; one more failure in the window gives up on it.
//! Time is an argument (milliseconds on any monotonic clock), so this is tested without sleeping.

use std::collections::VecDeque;

/// The default: 5 restarts in 10 s, as in Erlang/OTP's usual settings.
pub const RESTARTS_MAX: u32 = 5;
pub const RESTART_WINDOW_MS: u64 = 10_000;

/// How many restarts a child gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestartPolicy {
    pub max_restarts: u32,
    pub window_ms: u64,
}

impl RestartPolicy {
    /// Why a child is given up on: its last failure, past this policy's limit.
    pub fn gave_up(&self, last_failure: &str) -> String {
        format!(
            "restarted {} times within {} ms; last failure: {last_failure}",
            self.max_restarts, self.window_ms
        )
    }
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy { max_restarts: RESTARTS_MAX, window_ms: RESTART_WINDOW_MS }
    }
}

/// What to do about a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Restart,
    GiveUp,
}

/// Failure history of one child.
#[derive(Clone, Debug, Default)]
pub struct RestartTracker {
    recent_ms: VecDeque<u64>,
}

impl RestartTracker {
    /// Records a failure at `now_ms` and decides.
    pub fn on_failure(&mut self, policy: RestartPolicy, now_ms: u64) -> Decision {
        while self.recent_ms.front().is_some_and(|&t| now_ms.saturating_sub(t) >= policy.window_ms) {
            self.recent_ms.pop_front();
        }
        if self.recent_ms.len() as u32 >= policy.max_restarts {
            return Decision::GiveUp;
        }
        self.recent_ms.push_back(now_ms);
        Decision::Restart
    }

    /// Restarts within the window as of the last failure.
    pub fn recent(&self) -> usize {
        self.recent_ms.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gives_up_one_past_the_limit_within_the_window() {
        let p = RestartPolicy { max_restarts: 3, window_ms: 1000 };
        let mut t = RestartTracker::default();
        for now in [0, 10, 20] {
            assert_eq!(t.on_failure(p, now), Decision::Restart);
        }
        assert_eq!(t.on_failure(p, 30), Decision::GiveUp);
    }

    #[test]
    fn old_failures_age_out() {
        let p = RestartPolicy { max_restarts: 2, window_ms: 100 };
        let mut t = RestartTracker::default();
        assert_eq!(t.on_failure(p, 0), Decision::Restart);
        assert_eq!(t.on_failure(p, 50), Decision::Restart);
        assert_eq!(t.on_failure(p, 100), Decision::Restart, "the failure at 0 left the window");
        assert_eq!(t.on_failure(p, 120), Decision::GiveUp);
        assert_eq!(t.recent(), 2);
    }
}
