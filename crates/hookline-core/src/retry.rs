//! Retry-policy math: when the next attempt of a failed delivery is due.
//!
//! A schedule is the list of delays before each retry; the first attempt is immediate.
//! Every delay is jittered by ±20% so that receivers recovering from an outage are not
//! hit by a synchronised wave. `Retry-After` on 429/503 can push a retry later, never
//! earlier, and never beyond [`MAX_RETRY_AFTER`].

use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;

/// The default delays before retries 1–9: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h,
/// 24 h. With the immediate first attempt that is ten attempts over about three days.
pub const DEFAULT_SCHEDULE: [Duration; 9] = [
    Duration::from_secs(5),
    Duration::from_secs(5 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(2 * 3600),
    Duration::from_secs(5 * 3600),
    Duration::from_secs(10 * 3600),
    Duration::from_secs(14 * 3600),
    Duration::from_secs(20 * 3600),
    Duration::from_secs(24 * 3600),
];

/// Jitter applied to every delay, as a fraction either way.
pub const JITTER: f64 = 0.20;
/// The longest delay a `Retry-After` header may impose.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);
/// Most retries a schedule may hold.
pub const MAX_SCHEDULE_LEN: usize = 50;
/// Longest single delay a schedule may hold.
pub const MAX_SCHEDULE_DELAY: Duration = Duration::from_secs(7 * 24 * 3600);

/// The delays before each retry of a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    schedule: Vec<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            schedule: DEFAULT_SCHEDULE.to_vec(),
        }
    }
}

impl RetryPolicy {
    /// A policy from a subscription's schedule, or the default one when it has none.
    pub fn from_schedule(schedule: Option<&[Duration]>) -> Self {
        match schedule {
            Some(s) => Self {
                schedule: s.to_vec(),
            },
            None => Self::default(),
        }
    }

    pub fn schedule(&self) -> &[Duration] {
        &self.schedule
    }

    /// Total attempts the policy allows, the first one included.
    pub fn max_attempts(&self) -> u32 {
        u32::try_from(self.schedule.len())
            .unwrap_or(u32::MAX)
            .saturating_add(1)
    }

    /// The un-jittered delay after the `attempts_made`-th attempt failed, or `None` when
    /// the schedule is spent.
    pub fn base_delay(&self, attempts_made: u32) -> Option<Duration> {
        let index = usize::try_from(attempts_made.checked_sub(1)?).ok()?;
        self.schedule.get(index).copied()
    }

    /// When the next attempt is due after the `attempts_made`-th failed at `now`, with
    /// jitter and an optional `Retry-After`; `None` when the schedule is spent.
    pub fn next_attempt_at(
        &self,
        attempts_made: u32,
        now: DateTime<Utc>,
        retry_after: Option<Duration>,
        rng: &mut impl Rng,
    ) -> Option<DateTime<Utc>> {
        let base = self.base_delay(attempts_made)?;
        let delay = honour_retry_after(jitter(base, rng), retry_after);
        let delay = chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
        Some(
            now.checked_add_signed(delay)
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
        )
    }
}

/// `delay` scaled by a uniform factor in [1 − JITTER, 1 + JITTER].
pub fn jitter(delay: Duration, rng: &mut impl Rng) -> Duration {
    if delay.is_zero() {
        return delay;
    }
    let factor = rng.random_range((1.0 - JITTER)..=(1.0 + JITTER));
    delay.mul_f64(factor)
}

/// The scheduled delay, pushed later (never earlier) by a `Retry-After` capped at
/// [`MAX_RETRY_AFTER`].
pub fn honour_retry_after(scheduled: Duration, retry_after: Option<Duration>) -> Duration {
    match retry_after {
        Some(asked) => scheduled.max(asked.min(MAX_RETRY_AFTER)),
        None => scheduled,
    }
}

/// Parses a `Retry-After` value: delay-seconds or an HTTP date (relative to `now`).
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = DateTime::parse_from_rfc2822(value)
        .ok()?
        .with_timezone(&Utc);
    Some((at - now).to_std().unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn default_schedule_is_ten_attempts() {
        let p = RetryPolicy::default();
        assert_eq!(p.max_attempts(), 10);
        assert_eq!(p.base_delay(1), Some(Duration::from_secs(5)));
        assert_eq!(p.base_delay(2), Some(Duration::from_secs(300)));
        assert_eq!(p.base_delay(9), Some(Duration::from_secs(24 * 3600)));
        assert_eq!(p.base_delay(10), None);
        assert_eq!(p.base_delay(0), None);
    }

    #[test]
    fn jitter_stays_within_twenty_percent_and_varies() {
        let mut rng = StdRng::seed_from_u64(7);
        let base = Duration::from_secs(100);
        let samples: Vec<_> = (0..1000).map(|_| jitter(base, &mut rng)).collect();
        assert!(samples.iter().all(|d| *d >= Duration::from_secs(80)));
        assert!(samples.iter().all(|d| *d <= Duration::from_secs(120)));
        assert!(samples.iter().any(|d| *d < Duration::from_secs(90)));
        assert!(samples.iter().any(|d| *d > Duration::from_secs(110)));
    }

    #[test]
    fn next_attempt_is_none_when_spent() {
        let p = RetryPolicy::from_schedule(Some(&[Duration::from_millis(10)]));
        let mut rng = StdRng::seed_from_u64(1);
        let now = Utc::now();
        let next = p.next_attempt_at(1, now, None, &mut rng).unwrap();
        assert!(next >= now + chrono::Duration::milliseconds(8));
        assert_eq!(p.next_attempt_at(2, now, None, &mut rng), None);
    }

    #[test]
    fn retry_after_delays_but_never_hastens_and_is_capped() {
        let five = Duration::from_secs(5);
        assert_eq!(
            honour_retry_after(five, Some(Duration::from_secs(60))),
            Duration::from_secs(60)
        );
        assert_eq!(honour_retry_after(five, Some(Duration::from_secs(1))), five);
        assert_eq!(
            honour_retry_after(five, Some(Duration::from_secs(10 * 86400))),
            MAX_RETRY_AFTER
        );
    }

    #[test]
    fn parses_retry_after_seconds_and_dates() {
        let now = DateTime::parse_from_rfc2822("Wed, 21 Oct 2015 07:28:00 GMT")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:29:00 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
