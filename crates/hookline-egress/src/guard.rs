//! [`Egress`]: the policy and the lookup together, as the registry (create-time check)
//! and the dispatcher (connect-time check, through [`Egress::resolver`]) use them.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use url::{Host, Url};

use crate::lookup::{Lookup, SystemLookup};
use crate::policy::{EgressPolicy, Refusal};

/// How long the create-time check waits for DNS before it lets the URL through (the
/// connect-time check still applies).
const CREATE_LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);

/// A URL whose host is, or resolves to, a refused address.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub struct EgressRefused {
    /// The host name, when the address came from DNS (`None` for a literal address).
    pub name: Option<String>,
    pub refusal: Refusal,
}

impl fmt::Display for EgressRefused {
    /// A resolved address is not shown (it may describe the operator's network); its class
    /// is. A loopback address is shown, since it is the same everywhere.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.refusal;
        match &self.name {
            None => write!(f, "{r}; {}", r.advice()),
            Some(name) if r.address.is_loopback() || r.denied => {
                write!(f, "{name} resolves to {r}; {}", r.advice())
            }
            Some(name) => write!(
                f,
                "{name} resolves to {} ({}); {}",
                r.class,
                r.range,
                r.advice_for(r.range)
            ),
        }
    }
}

/// The egress policy with the lookup it applies to names. Cheap to clone.
#[derive(Clone)]
pub struct Egress {
    policy: Arc<EgressPolicy>,
    lookup: Arc<dyn Lookup>,
}

impl fmt::Debug for Egress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Egress")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Default for Egress {
    /// The default policy on the system resolver.
    fn default() -> Self {
        Self::system(EgressPolicy::default())
    }
}

impl Egress {
    pub fn new(policy: EgressPolicy, lookup: Arc<dyn Lookup>) -> Self {
        Self {
            policy: Arc::new(policy),
            lookup,
        }
    }

    /// `policy` on the system resolver.
    pub fn system(policy: EgressPolicy) -> Self {
        Self::new(policy, Arc::new(SystemLookup))
    }

    pub fn policy(&self) -> &EgressPolicy {
        &self.policy
    }

    pub(crate) fn lookup(&self) -> &dyn Lookup {
        self.lookup.as_ref()
    }

    /// Checks a URL whose host is an IP address (however it was written: the URL parser
    /// has already turned `0x7f000001`, `2130706433`, `127.1` and `0177.0.0.1` into
    /// `127.0.0.1`). A URL with a host name passes: its addresses are checked when they
    /// are resolved. The HTTP client does not resolve literal addresses, so this is the
    /// connect-time check for them.
    pub fn check_literal(&self, url: &Url) -> Result<(), EgressRefused> {
        let address = match url.host() {
            Some(Host::Ipv4(v4)) => IpAddr::V4(v4),
            Some(Host::Ipv6(v6)) => IpAddr::V6(v6),
            _ => return Ok(()),
        };
        self.policy.check(address).map_err(|refusal| EgressRefused {
            name: None,
            refusal,
        })
    }

    /// The create-time check: a literal address, or every address the host name resolves
    /// to now. A name that does not resolve (yet) passes.
    pub async fn check_url(&self, url: &Url) -> Result<(), EgressRefused> {
        self.check_literal(url)?;
        let Some(Host::Domain(name)) = url.host() else {
            return Ok(());
        };
        let answer = tokio::time::timeout(CREATE_LOOKUP_TIMEOUT, self.lookup.lookup(name)).await;
        let Ok(Ok(addrs)) = answer else {
            return Ok(());
        };
        for address in addrs {
            self.policy
                .check(address)
                .map_err(|refusal| EgressRefused {
                    name: Some(name.to_string()),
                    refusal,
                })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lookup::ScriptedLookup;
    use crate::policy::parse_range;

    fn url(text: &str) -> Url {
        Url::parse(text).unwrap()
    }

    #[test]
    fn every_odd_spelling_of_loopback_is_refused() {
        let egress = Egress::default();
        for text in [
            "http://127.0.0.1:9090/metrics",
            "http://0x7f000001/",
            "http://2130706433/",
            "http://127.1/",
            "http://0177.0.0.1/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::1]/",
            "http://0.0.0.0/",
            "http://169.254.169.254/latest/meta-data/",
        ] {
            let e = egress.check_literal(&url(text)).expect_err(text);
            assert!(e.to_string().contains("egress_allow"), "{e}");
        }
        assert!(egress.check_literal(&url("http://8.8.8.8/")).is_ok());
    }

    #[tokio::test]
    async fn names_are_checked_on_what_they_resolve_to_now() {
        let lookup = Arc::new(ScriptedLookup::default());
        let egress = Egress::new(EgressPolicy::default(), lookup.clone());
        // Not resolving yet is not an error.
        assert!(egress.check_url(&url("http://later.test/")).await.is_ok());
        lookup.set(
            "inside.test",
            &["8.8.8.8".parse().unwrap(), "10.1.2.3".parse().unwrap()],
        );
        let e = egress
            .check_url(&url("http://inside.test/"))
            .await
            .unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("inside.test resolves to a private address"),
            "{text}"
        );
        assert!(
            !text.contains("10.1.2.3"),
            "the resolved address is not shown: {text}"
        );
        lookup.set("outside.test", &["8.8.8.8".parse().unwrap()]);
        assert!(egress.check_url(&url("http://outside.test/")).await.is_ok());
    }

    /// The per-request cost of the literal check (the one the dispatcher makes before
    /// every request): `cargo test --release -p hookline-egress -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement; run by hand"]
    fn measure_literal_check_cost() {
        let allowed = Egress::system(EgressPolicy::new(
            vec![parse_range("127.0.0.1").unwrap()],
            vec![],
        ));
        let urls = [
            url("http://127.0.0.1:8080/hook"),
            url("https://93.184.216.34/hook"),
            url("http://[2606:4700::1111]/hook"),
            url("http://10.0.0.1/hook"),
        ];
        const ROUNDS: usize = 1_000_000;
        let started = std::time::Instant::now();
        let mut refused = 0usize;
        for i in 0..ROUNDS {
            let u = std::hint::black_box(&urls[i % urls.len()]);
            refused += usize::from(allowed.check_literal(u).is_err());
        }
        let per = started.elapsed().as_nanos() as f64 / ROUNDS as f64;
        println!("check_literal: {per:.0} ns per URL ({refused} refused of {ROUNDS})");
    }

    #[tokio::test]
    async fn localhost_is_refused_and_can_be_allowed() {
        let e = Egress::default()
            .check_url(&url("http://localhost:8000/webhook"))
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("HOOKLINE_EGRESS_ALLOW=127.0.0.1/32"),
            "{e}"
        );
        let open = Egress::system(EgressPolicy::new(
            vec![
                parse_range("127.0.0.1").unwrap(),
                parse_range("::1").unwrap(),
            ],
            vec![],
        ));
        assert!(open.check_url(&url("http://localhost:8000/")).await.is_ok());
    }
}
