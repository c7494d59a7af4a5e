//! The egress policy, in one place for every service that touches a tenant's URL.
//!
//! Tenants type URLs; Hookline connects to them. Without a policy a tenant key reaches
//! whatever the server can reach (loopback admin ports, cloud metadata, the database).
//! [`EgressPolicy`] says which addresses may be reached (by default only globally
//! routable unicast), [`Egress`] applies it to URLs at create time and, through
//! [`Egress::resolver`], to the addresses DNS actually returns when connecting, so a name
//! that resolves (or rebinds) to a refused address is never connected to.

mod guard;
mod lookup;
mod policy;
mod resolver;

pub use guard::{Egress, EgressRefused};
pub use lookup::{Lookup, LookupFuture, ScriptedLookup, SystemLookup};
pub use policy::{EgressPolicy, ParseRangeError, Refusal, parse_range};
pub use resolver::EgressResolver;
