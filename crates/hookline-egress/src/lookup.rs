//! Name lookup behind a trait, so that tests can script the answers DNS gives (and change
//! them between the create-time check and the delivery, as a rebinding attacker would).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::pin::Pin;
use std::sync::Mutex;

/// What a lookup returns.
pub type LookupFuture<'a> = Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + 'a>>;

/// Resolves a host name to addresses.
pub trait Lookup: Send + Sync + 'static {
    fn lookup<'a>(&'a self, host: &'a str) -> LookupFuture<'a>;
}

/// The system's resolver (`getaddrinfo` on a blocking thread). `localhost` and names
/// under `.localhost` are loopback without asking anyone (RFC 6761).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemLookup;

impl Lookup for SystemLookup {
    fn lookup<'a>(&'a self, host: &'a str) -> LookupFuture<'a> {
        Box::pin(async move {
            if is_localhost(host) {
                return Ok(vec![
                    IpAddr::V4(Ipv4Addr::LOCALHOST),
                    IpAddr::V6(Ipv6Addr::LOCALHOST),
                ]);
            }
            let addrs = tokio::net::lookup_host((host, 0)).await?;
            Ok(addrs.map(|a| a.ip()).collect())
        })
    }
}

fn is_localhost(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    host == "localhost" || host.ends_with(".localhost")
}

/// Answers from a table the test fills and changes; names not in it do not resolve.
#[derive(Debug, Default)]
pub struct ScriptedLookup {
    answers: Mutex<HashMap<String, Vec<IpAddr>>>,
}

impl ScriptedLookup {
    /// From now on, `host` resolves to `addrs`.
    pub fn set(&self, host: &str, addrs: &[IpAddr]) {
        self.answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(host.to_ascii_lowercase(), addrs.to_vec());
    }
}

impl Lookup for ScriptedLookup {
    fn lookup<'a>(&'a self, host: &'a str) -> LookupFuture<'a> {
        let answer = self
            .answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&host.to_ascii_lowercase())
            .cloned();
        Box::pin(async move {
            answer.ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, format!("{host} is not scripted"))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn localhost_is_loopback_without_a_lookup() {
        for host in ["localhost", "LOCALHOST.", "app.localhost"] {
            let addrs = SystemLookup.lookup(host).await.unwrap();
            assert!(addrs.iter().all(IpAddr::is_loopback), "{host}: {addrs:?}");
        }
        assert!(!is_localhost("localhost.example.com"));
    }

    #[tokio::test]
    async fn scripted_answers_change() {
        let lookup = ScriptedLookup::default();
        assert!(lookup.lookup("a.test").await.is_err());
        lookup.set("a.test", &["8.8.8.8".parse().unwrap()]);
        assert_eq!(lookup.lookup("A.test").await.unwrap().len(), 1);
    }
}
