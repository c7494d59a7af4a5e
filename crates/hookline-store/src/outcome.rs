//! The database-independent half of `record_outcomes`: how a delivery's state follows from
//! the outcomes of its attempts, applied in the order given. Each adapter reads the
//! deliveries' current state into a [`Tally`] (under its locks), calls [`apply`], and writes
//! the changed tallies, the new attempts and the retry-schedule rows back.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use hookline_core::Id;
use hookline_core::model::{Attempt, DeliveryStatus};

use crate::port::{AttemptOutcome, NextStep};

/// A delivery's state while the outcomes of a batch are applied to it, in order.
pub(crate) struct Tally {
    pub status: DeliveryStatus,
    pub attempt_count: u32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub last_attempt_at: Option<DateTime<Utc>>,
    pub last_status_code: Option<u16>,
    pub last_error: Option<String>,
    pub deferred_reason: Option<String>,
    /// The highest attempt number recorded.
    pub last_number: u32,
    /// Attempt ids of the batch that this delivery has recorded already.
    pub known_attempts: HashSet<String>,
    pub changed: bool,
    /// The delivery has a place in an ordered subscription's queue (see `ordered`).
    pub ordered: bool,
}

impl Tally {
    /// The retry-schedule row the delivery needs after the batch: the due time and the
    /// number of the attempt it will make, or `None` (no row).
    pub fn schedule(&self) -> Option<(DateTime<Utc>, u32)> {
        match (self.status, self.next_attempt_at) {
            (DeliveryStatus::Retrying, Some(due)) => {
                Some((due, self.attempt_count.saturating_add(1)))
            }
            _ => None,
        }
    }
}

/// An attempt to insert, numbered after the delivery's last one.
pub(crate) struct NewAttempt<'a> {
    /// The outcome names the delivery; the attempt's own field is not trusted over it.
    pub delivery_id: &'a Id,
    pub number: u32,
    pub attempt: &'a Attempt,
}

/// The deliveries of a batch (sorted, each once: the order rows are locked in) and the ids
/// of its attempts.
pub(crate) fn batch_ids(outcomes: &[AttemptOutcome]) -> (Vec<&str>, Vec<&str>) {
    let mut ids: Vec<&str> = outcomes.iter().map(|o| o.delivery_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    let attempt_ids = outcomes
        .iter()
        .filter_map(|o| o.attempt.as_ref())
        .map(|a| a.id.as_str())
        .collect();
    (ids, attempt_ids)
}

/// Applies the outcomes in the order given to the tallies of the deliveries that exist
/// (others are skipped: their subscription was deleted); returns the attempts to insert.
/// An outcome whose attempt the delivery has recorded already is a write being retried and
/// is skipped whole.
pub(crate) fn apply<'a>(
    tallies: &mut HashMap<String, Tally>,
    outcomes: &'a [AttemptOutcome],
) -> Vec<NewAttempt<'a>> {
    let mut attempts = Vec::new();
    for outcome in outcomes {
        let Some(t) = tallies.get_mut(outcome.delivery_id.as_str()) else {
            continue;
        };
        if let Some(a) = &outcome.attempt {
            if !t.known_attempts.insert(a.id.to_string()) {
                continue;
            }
            t.last_number = t.last_number.saturating_add(1);
            t.attempt_count = t.attempt_count.saturating_add(1);
            attempts.push(NewAttempt {
                delivery_id: &outcome.delivery_id,
                number: t.last_number,
                attempt: a,
            });
            t.last_attempt_at = Some(a.started_at);
            t.last_status_code = a.status_code;
            t.last_error = attempt_error(a);
        }
        next_step(t, outcome);
        t.deferred_reason = outcome.deferral();
        t.changed = true;
    }
    attempts
}

/// The status (and due time) the outcome's next step gives the delivery.
fn next_step(t: &mut Tally, outcome: &AttemptOutcome) {
    match &outcome.next {
        NextStep::Succeeded => {
            t.status = DeliveryStatus::Succeeded;
            t.next_attempt_at = None;
        }
        NextStep::RetryAt(at) => {
            t.status = DeliveryStatus::Retrying;
            t.next_attempt_at = Some(*at);
        }
        NextStep::Failed { reason } => {
            t.status = DeliveryStatus::Failed;
            t.next_attempt_at = None;
            // Say why it stopped, and keep what the last attempt got.
            t.last_error = Some(match (&outcome.attempt, &t.last_error) {
                (Some(_), Some(last)) => format!("{reason} (last attempt: {last})"),
                _ => reason.clone(),
            });
        }
    }
}

/// What `last_error` says after an attempt: its error, else a non-2xx status.
fn attempt_error(attempt: &Attempt) -> Option<String> {
    attempt.error_message.clone().or_else(|| {
        attempt
            .status_code
            .filter(|code| !(200..300).contains(code))
            .map(|code| format!("HTTP {code}"))
    })
}

/// A `u32` for an `integer` column, saturating (counts and attempt numbers never reach it).
pub(crate) fn int4(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;
    use hookline_core::IdKind;

    use super::*;

    fn tally() -> Tally {
        Tally {
            status: DeliveryStatus::Pending,
            attempt_count: 0,
            next_attempt_at: None,
            last_attempt_at: None,
            last_status_code: None,
            last_error: None,
            deferred_reason: None,
            last_number: 0,
            known_attempts: HashSet::new(),
            changed: false,
            ordered: false,
        }
    }

    fn outcome(delivery: &Id, code: u16, next: NextStep) -> AttemptOutcome {
        AttemptOutcome {
            delivery_id: delivery.clone(),
            attempt: Some(Attempt {
                id: Id::new(IdKind::Attempt),
                delivery_id: delivery.clone(),
                attempt_number: 0,
                started_at: Utc::now(),
                duration_ms: 5,
                status_code: Some(code),
                error_class: None,
                error_message: None,
                response_excerpt: Vec::new(),
            }),
            next,
            deferred_reason: None,
        }
    }

    #[test]
    fn outcomes_apply_in_order_and_a_repeated_attempt_is_skipped() {
        let d = Id::new(IdKind::Delivery);
        let due = Utc::now() + TimeDelta::seconds(30);
        let first = outcome(&d, 503, NextStep::RetryAt(due));
        let failed = NextStep::Failed {
            reason: "schedule spent".to_string(),
        };
        let outcomes = [first.clone(), outcome(&d, 500, failed), first];
        let mut tallies = HashMap::from([(d.to_string(), tally())]);
        let attempts = apply(&mut tallies, &outcomes);
        assert_eq!(attempts.len(), 2, "the repeat of the first is skipped");
        assert_eq!(attempts[1].number, 2);
        let t = &tallies[d.as_str()];
        assert_eq!(t.status, DeliveryStatus::Failed);
        assert_eq!(t.attempt_count, 2);
        assert_eq!(
            t.last_error.as_deref(),
            Some("schedule spent (last attempt: HTTP 500)")
        );
        assert_eq!(t.schedule(), None);
    }

    #[test]
    fn a_retry_is_scheduled_for_the_next_attempt_number() {
        let d = Id::new(IdKind::Delivery);
        let due = Utc::now();
        let mut tallies = HashMap::from([(d.to_string(), tally())]);
        apply(&mut tallies, &[outcome(&d, 429, NextStep::RetryAt(due))]);
        assert_eq!(tallies[d.as_str()].schedule(), Some((due, 2)));
    }
}
