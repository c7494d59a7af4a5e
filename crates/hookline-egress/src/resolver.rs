//! The connect-time check: a `reqwest` resolver that looks a name up, drops every
//! address the policy refuses, and hands the client only checked addresses. The client
//! connects to nothing else, so a name that resolves (or rebinds) to a refused address
//! after the create-time check is still never connected to.

use std::io;
use std::net::SocketAddr;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use crate::guard::{Egress, EgressRefused};

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct EgressResolver {
    egress: Egress,
    exempt_host: Option<String>,
}

impl Egress {
    /// A resolver for `reqwest` that connects only to addresses this policy allows.
    /// `exempt_host` (the operator's proxy) is resolved without the policy.
    pub fn resolver(&self, exempt_host: Option<String>) -> EgressResolver {
        EgressResolver::new(self.clone(), exempt_host)
    }
}

impl EgressResolver {
    fn new(egress: Egress, exempt_host: Option<String>) -> Self {
        Self {
            egress,
            exempt_host: exempt_host.map(|h| h.to_ascii_lowercase()),
        }
    }
}

impl Resolve for EgressResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let this = self.clone();
        Box::pin(async move {
            let host = name.as_str();
            let addrs = this.egress.lookup().lookup(host).await?;
            let exempt = this
                .exempt_host
                .as_deref()
                .is_some_and(|h| h.eq_ignore_ascii_case(host));
            let mut allowed = Vec::with_capacity(addrs.len());
            let mut first_refusal = None;
            for address in addrs {
                match this.egress.policy().check(address) {
                    Err(refusal) if !exempt => {
                        first_refusal.get_or_insert(refusal);
                    }
                    _ => allowed.push(SocketAddr::new(address, 0)),
                }
            }
            if allowed.is_empty() {
                return Err(match first_refusal {
                    Some(refusal) => Box::new(EgressRefused {
                        name: Some(host.to_string()),
                        refusal,
                    }) as _,
                    None => Box::new(io::Error::new(
                        io::ErrorKind::NotFound,
                        "the name resolved to no address",
                    )) as _,
                });
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}
