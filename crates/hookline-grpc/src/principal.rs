//! Who is calling and what that caller may touch: the one place the admin/tenant scoping
//! rules are written. [`crate::auth`] finds the principal of a token; handlers and the
//! per-key limits ([`crate::keys`]) only read it.

use hookline_core::Id;
use tonic::Status;

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// May act on every tenant and on the catalogue.
    Admin { key_id: Id },
    /// May act on its own tenant only.
    Tenant { key_id: Id, tenant_id: Id },
    /// A console portal session: the same scope as a tenant key, but backed by a signed
    /// link the console verified rather than by a stored key. `session_id` names it in
    /// the per-key limits.
    Portal { session_id: Id, tenant_id: Id },
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        matches!(self, Principal::Admin { .. })
    }

    /// The stored key, or for a portal session its id: what per-key limits count.
    pub fn key_id(&self) -> &Id {
        match self {
            Principal::Admin { key_id } | Principal::Tenant { key_id, .. } => key_id,
            Principal::Portal { session_id, .. } => session_id,
        }
    }

    /// The tenant a tenant key is bound to.
    pub fn tenant(&self) -> Option<&Id> {
        match self {
            Principal::Admin { .. } => None,
            Principal::Tenant { tenant_id, .. } | Principal::Portal { tenant_id, .. } => {
                Some(tenant_id)
            }
        }
    }

    /// Admins pass; anyone else gets `PERMISSION_DENIED` naming what needs an admin key.
    pub fn require_admin(&self, what: &str) -> Result<(), Status> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "{what} needs an admin API key; this key is scoped to one tenant"
            )))
        }
    }

    /// Whether this caller may see and change `tenant_id`'s data.
    pub fn may_access(&self, tenant_id: &Id) -> bool {
        self.tenant().is_none_or(|own| own == tenant_id)
    }

    /// Admin keys are visible to admins only; others get `NOT_FOUND`.
    pub fn check_tenant_admin(&self, key_id: &str) -> Result<(), Status> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(Status::not_found(format!("API key {key_id} not found")))
        }
    }

    /// For a call addressed to `tenant_id`: a tenant key of another tenant is refused with
    /// `PERMISSION_DENIED`, whether or not that tenant exists, so nothing is revealed.
    pub fn require_tenant(&self, tenant_id: &Id) -> Result<(), Status> {
        match self.tenant() {
            Some(own) if own != tenant_id => Err(Status::permission_denied(format!(
                "this API key is scoped to tenant {own} and cannot act on tenant {tenant_id}"
            ))),
            _ => Ok(()),
        }
    }

    /// For an object found by its own id that belongs to another tenant: answers `NOT_FOUND`, exactly as for a
    /// tenant that does not exist, so a key reveals nothing about other tenants.
    pub fn check_tenant(&self, tenant_id: &Id, noun: &str, id: &str) -> Result<(), Status> {
        if self.may_access(tenant_id) {
            Ok(())
        } else {
            Err(Status::not_found(format!("{noun} {id} not found")))
        }
    }
}
