//! The services one process can run, and how `--services` names them.

use std::collections::BTreeSet;
use std::fmt;

use anyhow::bail;

/// The services one process can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Service {
    Registry,
    Ingest,
    Dispatcher,
    Retry,
}

impl Service {
    pub const ALL: [Service; 4] = [
        Service::Registry,
        Service::Ingest,
        Service::Dispatcher,
        Service::Retry,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Service::Registry => "registry",
            Service::Ingest => "ingest",
            Service::Dispatcher => "dispatcher",
            Service::Retry => "retry",
        }
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Parses `registry,ingest,…`; `all` means all four.
pub fn parse_services(list: &str) -> anyhow::Result<BTreeSet<Service>> {
    let mut out = BTreeSet::new();
    for raw in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if raw == "all" {
            out.extend(Service::ALL);
            continue;
        }
        let Some(service) = Service::ALL.into_iter().find(|s| s.name() == raw) else {
            bail!("unknown service {raw:?}; allowed: all, registry, ingest, dispatcher, retry");
        };
        out.insert(service);
    }
    if out.is_empty() {
        bail!("--services names no service; allowed: all, registry, ingest, dispatcher, retry");
    }
    Ok(out)
}
