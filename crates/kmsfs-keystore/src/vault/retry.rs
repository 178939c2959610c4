//! The retry policy of the Vault / OpenBao client: one deadline per
//! operation, which answers are worth another try, and how long to wait
//! between tries.
//!
//! * **One deadline.** A request gets `timeout_secs` in total: health
//!   probes, every attempt on every node and every pause between them
//!   count against the same [`Deadline`]. No attempts × nodes × timeout.
//! * **What is retried.** Connection failures, timeouts and these answers:
//!   429 (rate limited), 500, 502, 503 and 504 ([`verdict`]). Every other
//!   answer (400, 403 — after the client's own re-login —, 404, …) cannot
//!   change by asking again and goes straight back to the caller.
//! * **Pauses.** Between rounds (a round tries each usable node once), an
//!   exponential backoff with jitter ([`Backoff`]), stretched to a server's
//!   `Retry-After` when it sends one; a pause that would end past the
//!   deadline is not taken.

use std::time::Duration;

use std::time::Instant;

/// First pause between rounds; doubled each round up to [`MAX_BACKOFF`].
pub(crate) const BASE_BACKOFF: Duration = Duration::from_millis(200);
/// Longest pause between rounds.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(4);
/// The least time an attempt on one node is given when other nodes are
/// still to be tried in the same round (unless less is left).
const MIN_ATTEMPT: Duration = Duration::from_secs(2);

/// The instant by which a whole operation must be over.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline(Instant);

impl Deadline {
    /// `budget` from now.
    pub(crate) fn after(budget: Duration) -> Self {
        Deadline(Instant::now() + budget)
    }

    /// Time left (zero once passed).
    pub(crate) fn remaining(&self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }

    /// True once the deadline has passed.
    pub(crate) fn passed(&self) -> bool {
        self.remaining().is_zero()
    }

    /// The time limit of one attempt when `nodes_left` nodes (this one
    /// included) may still be tried in this round: an equal share of what
    /// is left, so that a node that hangs cannot eat the whole deadline,
    /// but at least [`MIN_ATTEMPT`] so a slow answer is not cut short.
    /// `None` once the deadline has passed.
    pub(crate) fn share(&self, nodes_left: usize) -> Option<Duration> {
        share_of(self.remaining(), nodes_left)
    }

    /// True when a pause of `d` ends before the deadline.
    pub(crate) fn fits(&self, d: Duration) -> bool {
        d < self.remaining()
    }
}

/// [`Deadline::share`] for `left` time left.
fn share_of(left: Duration, nodes_left: usize) -> Option<Duration> {
    if left.is_zero() {
        return None;
    }
    let n = u32::try_from(nodes_left.max(1)).unwrap_or(u32::MAX);
    Some((left / n).max(MIN_ATTEMPT.min(left)))
}

/// Exponential backoff with jitter: the n-th pause is drawn from
/// `[d/2, d]` with `d = min(BASE × 2ⁿ, MAX)`, so that clients that failed
/// together do not come back together.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    round: u32,
}

impl Backoff {
    /// The next pause, at least `retry_after` (a server's `Retry-After`).
    pub(crate) fn next_pause(&mut self, retry_after: Option<Duration>) -> Duration {
        let p = pause(self.round, fastrand::f64(), retry_after);
        self.round = self.round.saturating_add(1);
        p
    }
}

/// The pause before retry `round` (0-based) for a jitter draw `unit` in
/// `[0, 1)`.
fn pause(round: u32, unit: f64, retry_after: Option<Duration>) -> Duration {
    let ceiling = BASE_BACKOFF
        .saturating_mul(1u32 << round.min(16))
        .min(MAX_BACKOFF);
    let half = ceiling / 2;
    let jittered = half + half.mul_f64(unit.clamp(0.0, 1.0));
    jittered.max(retry_after.unwrap_or_default())
}

/// What to do with an HTTP answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// A real answer, to hand to the caller (success or an error that
    /// asking again cannot change).
    Final,
    /// 503 from a sealed node: that node is unusable until unsealed.
    Sealed,
    /// 502, 503 or 504: the node (or a proxy in front of it) cannot serve
    /// now, e.g. a standby whose active node is gone during an election.
    NodeDown,
    /// 429 (rate limited) or 500: the node is there but busy or failing;
    /// worth another try after a pause.
    Busy,
}

/// Classifies an answer by status (and, for 503, by the `errors` strings
/// Vault sends, which say "sealed" for a sealed node).
pub(crate) fn verdict(status: u16, errors: &[String]) -> Verdict {
    match status {
        503 if errors.iter().any(|e| e.contains("sealed")) => Verdict::Sealed,
        502..=504 => Verdict::NodeDown,
        429 | 500 => Verdict::Busy,
        _ => Verdict::Final,
    }
}

/// The `Retry-After` header in seconds (the HTTP-date form is ignored:
/// Vault's rate limiter sends seconds).
pub(crate) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_answers_that_can_change_are_retried() {
        let sealed = vec!["Vault is sealed".to_string()];
        assert_eq!(verdict(503, &sealed), Verdict::Sealed);
        assert_eq!(verdict(503, &[]), Verdict::NodeDown);
        assert_eq!(verdict(502, &[]), Verdict::NodeDown);
        assert_eq!(verdict(504, &[]), Verdict::NodeDown);
        assert_eq!(verdict(429, &[]), Verdict::Busy);
        assert_eq!(verdict(500, &[]), Verdict::Busy);
        for s in [200, 204, 400, 401, 403, 404, 405, 409, 412, 501] {
            assert_eq!(verdict(s, &[]), Verdict::Final, "{s}");
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        // The jitter keeps each pause within [d/2, d].
        for round in 0..8 {
            let d = BASE_BACKOFF.saturating_mul(1 << round).min(MAX_BACKOFF);
            assert_eq!(pause(round, 0.0, None), d / 2);
            assert_eq!(pause(round, 1.0, None), d);
            let mid = pause(round, 0.5, None);
            assert!(mid > d / 2 && mid < d, "{mid:?} for {d:?}");
        }
        assert_eq!(pause(40, 1.0, None), MAX_BACKOFF);
        // A server's Retry-After stretches the pause, never shortens it.
        assert_eq!(
            pause(0, 0.0, Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
        assert_eq!(pause(5, 1.0, Some(Duration::ZERO)), MAX_BACKOFF);
        // Two draws differ (jitter is real), within the same bounds.
        let mut b = Backoff::default();
        let first = b.next_pause(None);
        assert!(first >= BASE_BACKOFF / 2 && first <= BASE_BACKOFF);
        let second = b.next_pause(None);
        assert!(second >= BASE_BACKOFF && second <= BASE_BACKOFF * 2);
    }

    #[test]
    fn one_deadline_is_shared_between_nodes() {
        let s = |secs: u64, n| share_of(Duration::from_secs(secs), n);
        assert_eq!(s(9, 3), Some(Duration::from_secs(3)));
        assert_eq!(s(9, 1), Some(Duration::from_secs(9)));
        // Never below the floor while that much is left...
        assert_eq!(s(9, 100), Some(MIN_ATTEMPT));
        // ...and never beyond what is left.
        assert_eq!(s(1, 3), Some(Duration::from_secs(1)));
        assert_eq!(s(0, 1), None);
        let d = Deadline::after(Duration::from_secs(60));
        assert!(d.fits(Duration::from_secs(1)));
        assert!(!d.fits(Duration::from_secs(61)));
        assert!(!d.passed());
        assert!(Deadline::after(Duration::ZERO).passed());
    }

    #[test]
    fn retry_after_in_seconds() {
        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(reqwest::header::RETRY_AFTER, "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert(
            reqwest::header::RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), None);
    }
}
