//! The database-independent half of `insert_events`: what a batch asks of each event before
//! the database is asked ([`plan`]), and the answer to each event once the database has said
//! what it stored ([`assemble`]). Each adapter does only the SQL in between.

use std::collections::{HashMap, HashSet};

use hookline_core::job::DeliveryJob;
use hookline_core::{Id, IdKind};

use crate::StoreError;
use crate::error::violated;
use crate::port::{InsertOutcome, NewEvent};

/// What the batch asks of one event.
pub(crate) enum Plan {
    /// Insert it, with these (delivery id, subscription id) pairs.
    Insert(Vec<(Id, Id)>),
    /// An earlier event of the batch (this index) has the same tenant and idempotency key.
    RepeatOf(usize),
}

/// A plan per event, in batch order: the first event of a (tenant, idempotency key) is
/// inserted, later ones repeat it; each subscription gets one delivery, even if a caller
/// named it twice.
pub(crate) fn plan(events: &[NewEvent]) -> Vec<Plan> {
    let mut first_with_key: HashMap<(&str, &str), usize> = HashMap::new();
    events
        .iter()
        .enumerate()
        .map(|(i, new)| {
            if let Some(key) = new.event.idempotency_key.as_deref() {
                let first = *first_with_key
                    .entry((new.event.tenant_id.as_str(), key))
                    .or_insert(i);
                if first != i {
                    return Plan::RepeatOf(first);
                }
            }
            let mut seen = HashSet::new();
            let deliveries = new
                .subscription_ids
                .iter()
                .filter(|s| seen.insert(*s))
                .map(|s| (Id::new(IdKind::Delivery), s.clone()))
                .collect();
            Plan::Insert(deliveries)
        })
        .collect()
}

/// The (tenant, idempotency key) of an event, as a key of [`Stored::originals`].
pub(crate) type KeyOf = (String, String);

/// What the database stored of a batch.
#[derive(Default)]
pub(crate) struct Stored {
    /// Ids of the events inserted.
    pub events: HashSet<String>,
    /// Ids of the deliveries inserted (those to subscriptions that still existed).
    pub deliveries: HashSet<String>,
    /// Those of them that wait behind the head of their ordered subscription: stored with
    /// no outbox row and no job (see `ordered`).
    pub held: HashSet<String>,
    /// The stored events holding the keys of events that were not inserted: their id and
    /// how many deliveries they have.
    pub originals: HashMap<KeyOf, (Id, u32)>,
}

/// The outcome of each event, in batch order.
pub(crate) fn assemble(
    events: &[NewEvent],
    plans: &[Plan],
    stored: &Stored,
) -> Result<Vec<InsertOutcome>, StoreError> {
    let mut outcomes: Vec<InsertOutcome> = Vec::with_capacity(events.len());
    for (new, plan) in events.iter().zip(plans) {
        let e = &new.event;
        let outcome = match plan {
            Plan::RepeatOf(first) => repeat_of(&outcomes[*first]),
            Plan::Insert(deliveries) if stored.events.contains(e.id.as_str()) => {
                let jobs = first_jobs(new, deliveries, stored);
                let held = deliveries
                    .iter()
                    .filter(|(id, _)| stored.held.contains(id.as_str()))
                    .count();
                InsertOutcome::Created {
                    event_id: e.id.clone(),
                    jobs,
                    held: u32::try_from(held).unwrap_or(u32::MAX),
                }
            }
            Plan::Insert(_) => {
                let key = e.idempotency_key.clone().unwrap_or_default();
                let (event_id, deliveries) = stored
                    .originals
                    .get(&(e.tenant_id.to_string(), key.clone()))
                    .cloned()
                    .ok_or_else(|| violated::key_event_vanished(&key, &e.tenant_id))?;
                InsertOutcome::Duplicate {
                    event_id,
                    deliveries,
                }
            }
        };
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

/// A repeat within the batch answers what its first event got, as a duplicate.
fn repeat_of(first: &InsertOutcome) -> InsertOutcome {
    let (event_id, deliveries) = match first {
        InsertOutcome::Created {
            event_id,
            jobs,
            held,
        } => (
            event_id.clone(),
            u32::try_from(jobs.len())
                .unwrap_or(u32::MAX)
                .saturating_add(*held),
        ),
        InsertOutcome::Duplicate {
            event_id,
            deliveries,
        } => (event_id.clone(), *deliveries),
    };
    InsertOutcome::Duplicate {
        event_id,
        deliveries,
    }
}

/// The first-attempt jobs of an inserted event: one per delivery that was inserted and is
/// not held behind its ordered subscription's head.
fn first_jobs(new: &NewEvent, deliveries: &[(Id, Id)], stored: &Stored) -> Vec<DeliveryJob> {
    let e = &new.event;
    deliveries
        .iter()
        .filter(|(d, _)| {
            stored.deliveries.contains(d.as_str()) && !stored.held.contains(d.as_str())
        })
        .map(|(d, s)| DeliveryJob {
            delivery_id: d.clone(),
            event_id: e.id.clone(),
            tenant_id: e.tenant_id.clone(),
            subscription_id: s.clone(),
            event_type: e.event_type.clone(),
            attempt_number: 1,
            payload: e.payload.clone(),
            traceparent: new.traceparent.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use hookline_core::model::Event;

    use super::*;

    fn keyed(tenant: &Id, key: &str, subscriptions: &[&Id]) -> NewEvent {
        NewEvent {
            event: Event {
                id: Id::new(IdKind::Event),
                tenant_id: tenant.clone(),
                event_type: "invoice.paid".to_string(),
                payload: b"{}".to_vec(),
                channels: Vec::new(),
                idempotency_key: Some(key.to_string()),
                created_at: Utc::now(),
            },
            subscription_ids: subscriptions.iter().map(|s| (*s).clone()).collect(),
            traceparent: None,
        }
    }

    #[test]
    fn repeats_in_a_batch_answer_the_first_and_subscriptions_get_one_delivery() {
        let (t, s) = (Id::new(IdKind::Tenant), Id::new(IdKind::Subscription));
        let events = [keyed(&t, "k", &[&s, &s]), keyed(&t, "k", &[&s])];
        let plans = plan(&events);
        let Plan::Insert(deliveries) = &plans[0] else {
            panic!("the first is inserted")
        };
        assert_eq!(deliveries.len(), 1);
        assert!(matches!(plans[1], Plan::RepeatOf(0)));
        let stored = Stored {
            events: [events[0].event.id.to_string()].into(),
            deliveries: [deliveries[0].0.to_string()].into(),
            held: HashSet::new(),
            originals: HashMap::new(),
        };
        let outcomes = assemble(&events, &plans, &stored).expect("assembled");
        assert!(matches!(&outcomes[0], InsertOutcome::Created { jobs, .. } if jobs.len() == 1));
        assert!(matches!(
            &outcomes[1],
            InsertOutcome::Duplicate { deliveries: 1, .. }
        ));
    }

    #[test]
    fn a_key_whose_event_vanished_asks_to_publish_again() {
        let t = Id::new(IdKind::Tenant);
        let events = [keyed(&t, "k", &[])];
        let plans = plan(&events);
        // Not inserted (the key was taken) and no original found: it was deleted meanwhile.
        let err = assemble(&events, &plans, &Stored::default()).expect_err("vanished");
        assert!(
            matches!(&err, StoreError::Retryable(m) if m.contains("publish again")),
            "{err:?}"
        );
    }
}
