//! Storage for Hookline: the port (traits in [`port`]) and its two adapters.
//!
//! Services depend on the traits only. [`postgres::PgStore`] backs them with PostgreSQL for
//! clusters, [`sqlite::SqliteStore`] with one SQLite file for the embedded mode; the schema
//! of each lives in `migrations/postgres` and `migrations/sqlite` and is embedded in the
//! binary ([`postgres::MIGRATOR`], [`sqlite::MIGRATOR`]).
//!
//! What does not depend on the database is written once, in modules of plain functions:
//! paging (`paging`), values to and from columns (`codec`), the plan and the answer of an
//! insert of events (`insert_plan`), the state machine of attempt outcomes (`outcome`) and
//! the errors with their messages (`error`). Each adapter folder holds only its SQL,
//! its row decoding and its translation of driver errors.

mod codec;
mod error;
mod insert_plan;
pub mod ordered;
mod outcome;
mod paging;
pub mod port;
pub mod postgres;
pub mod sealed;
pub mod sealing;
pub mod sqlite;

pub use error::StoreError;
pub use port::{
    AttemptOutcome, DEFAULT_PAGE_LIMIT, DeliveryFilter, DeliveryStore, EventFilter, EventStore,
    InsertOutcome, MAX_PAGE_LIMIT, NewApiKey, NewEvent, NewSubscription, NextStep, Page,
    PageRequest, RegistryStore, StoreHealth,
};
pub use postgres::PgStore;
pub use sealed::SealedRegistry;
pub use sqlite::SqliteStore;
