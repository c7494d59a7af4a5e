//! The retry service: it owns delivery state after the first attempt.
//!
//! The dispatcher records a failed attempt together with the time of the next one (a
//! `retry_schedule` row, in the same transaction). The [`Scheduler`] moves due rows to
//! the outbox and queues them, claiming rows with `FOR UPDATE SKIP LOCKED` so any number
//! of replicas share the work. The outbox relay of `hookline-outbox` runs here too.
//! [`DeliveryApi`] serves `hookline.v1.DeliveryService`.

mod api;
mod scheduler;

pub use api::DeliveryApi;
pub use scheduler::{Scheduler, SchedulerConfig};
