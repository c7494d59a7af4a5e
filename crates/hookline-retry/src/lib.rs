//! The retry scheduler: it owns delivery state after the first attempt.
//!
//! The dispatcher records a failed attempt together with the time of the next one (a
//! `retry_schedule` row, in the same transaction). The [`Scheduler`] moves due rows to
//! the outbox and queues them, claiming rows with `FOR UPDATE SKIP LOCKED` so any number
//! of replicas share the work. The `retry` service of the binary also runs the outbox
//! relay (`hookline-outbox`) and the DeliveryService API (`hookline-deliveries`).

mod scheduler;

pub use scheduler::{Scheduler, SchedulerConfig};
