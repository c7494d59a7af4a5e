//! The database-independent rules of ordered delivery (issue #11, part 2): which deliveries
//! of a batch become the head of their subscription's queue, which outcomes end a head (so
//! the next delivery is promoted), and whether a job may be attempted. Each adapter's
//! `ordered` module holds only the SQL; see docs/ARCHITECTURE.md "Ordered delivery".
//!
//! An ordered subscription has at most one head: the one delivery that is in the queue or
//! the retry schedule. Its other deliveries wait, `pending` with a sequence number and no
//! outbox row, until the head's outcome is final; then the lowest waiting one is promoted.

use std::collections::{HashMap, HashSet};

use hookline_core::model::{DeliveryStatus, Subscription, SubscriptionState};

use crate::outcome::Tally;

/// The deliveries of a batch whose head is now over: ordered deliveries whose outcome in
/// this batch is final (succeeded, or failed with the schedule spent or the subscription
/// gone). A retry or a deferral keeps the head.
pub(crate) fn finished(tallies: &HashMap<String, Tally>) -> Vec<&str> {
    let mut ids: Vec<&str> = tallies
        .iter()
        .filter(|(_, t)| t.ordered && t.changed && is_final(t.status))
        .map(|(id, _)| id.as_str())
        .collect();
    ids.sort_unstable();
    ids
}

/// Whether a delivery has its outcome for good.
pub(crate) fn is_final(status: DeliveryStatus) -> bool {
    matches!(status, DeliveryStatus::Succeeded | DeliveryStatus::Failed)
}

/// Of the ordered deliveries of one insert, in publish order as `(delivery, subscription)`,
/// those that become their subscription's head (the first of a subscription that has none,
/// per `with_head`); the others wait.
pub(crate) fn new_heads<'a>(
    ordered: impl IntoIterator<Item = (&'a str, &'a str)>,
    with_head: &HashSet<String>,
) -> Vec<(&'a str, &'a str)> {
    let mut taken: HashSet<&str> = HashSet::new();
    ordered
        .into_iter()
        .filter(|(_, s)| !with_head.contains(*s) && taken.insert(s))
        .collect()
}

/// Whether the subscription, as just stored, lets go of its queue: it is unordered (it may
/// just have been made so) or disabled. Its waiting deliveries are then all queued, so
/// nothing stays stuck behind a head that will not move.
pub(crate) fn releases(sub: &Subscription) -> bool {
    !sub.ordering.is_ordered() || sub.state == SubscriptionState::Disabled
}

/// Whether a job of a delivery may be attempted now, from what the store says of it: a
/// delivery that is gone or final is a duplicate (its outcome is recorded), and one of an
/// ordered subscription that is not its head waits for its turn.
pub fn may_attempt(status: Option<DeliveryStatus>, ordered: bool, head: bool) -> bool {
    match status {
        None => false,
        Some(s) if is_final(s) => false,
        Some(_) => !ordered || head,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_of_a_subscription_without_a_head_leads() {
        let with_head = HashSet::from(["sub_b".to_string()]);
        let batch = [
            ("d1", "sub_a"),
            ("d2", "sub_b"),
            ("d3", "sub_a"),
            ("d4", "sub_c"),
        ];
        assert_eq!(
            new_heads(batch, &with_head),
            vec![("d1", "sub_a"), ("d4", "sub_c")]
        );
    }

    #[test]
    fn only_the_head_of_an_ordered_subscription_is_attempted() {
        use DeliveryStatus::*;
        assert!(may_attempt(Some(Pending), false, false));
        assert!(may_attempt(Some(Pending), true, true));
        assert!(!may_attempt(Some(Pending), true, false));
        assert!(!may_attempt(Some(Succeeded), true, true));
        assert!(!may_attempt(Some(Failed), false, false));
        assert!(!may_attempt(None, false, false));
    }
}
