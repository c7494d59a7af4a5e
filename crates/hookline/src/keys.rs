//! API keys the binary makes itself: `hookline admin create-key`, and the first admin key
//! of an embedded installation, shown once by `serve`.
//!
//! The first key must never be lost: it is created only once the server is up (ports
//! bound, services running), and a marker file beside the database says whether its
//! banner was written out. The marker says `pending <key id>` before the key exists and
//! `shown` once the banner went out; a start that finds `pending` (the process died, or
//! stdout was closed, in between) revokes that key and shows a new one. An installation
//! whose admins already made keys with `admin create-key` gets no banner.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use hookline_core::{Id, IdKind};
use hookline_grpc::auth;
use hookline_store::StoreError;
use hookline_store::port::{NewApiKey, PageRequest, RegistryStore};

use crate::stdout::announce;

/// The marker file of the first admin key, in the data directory.
const FIRST_KEY_MARKER: &str = "first-admin-key";
/// The marker's content once the banner was shown.
const SHOWN: &str = "shown";
/// The name of the first admin key.
const FIRST_KEY_NAME: &str = "admin";

/// An API key just created, with the token that is shown only this once.
pub struct CreatedKey {
    pub id: Id,
    pub description: String,
    pub token: String,
}

impl fmt::Display for CreatedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "created API key {}; the token is shown only now:\n{}",
            self.description, self.token
        )
    }
}

/// Creates an API key (an admin key without `tenant`).
pub async fn create_key(
    store: &dyn RegistryStore,
    name: &str,
    tenant: Option<&str>,
) -> anyhow::Result<CreatedKey> {
    hookline_core::validate::name("--name", name)?;
    let tenant_id = match tenant {
        Some(t) => {
            let id = Id::parse(IdKind::Tenant, "--tenant", t)?;
            store
                .get_tenant(&id)
                .await
                .with_context(|| format!("tenant {id}"))?;
            Some(id)
        }
        None => None,
    };
    store_key(store, Id::new(IdKind::ApiKey), name, tenant_id).await
}

async fn store_key(
    store: &dyn RegistryStore,
    id: Id,
    name: &str,
    tenant_id: Option<Id>,
) -> anyhow::Result<CreatedKey> {
    let token = auth::generate_token();
    let key = store
        .create_api_key(&NewApiKey {
            id,
            name: name.to_string(),
            tenant_id,
            token_prefix: token.prefix,
            token_hash: token.hash,
        })
        .await
        .context("storing the key")?;
    let scope = key
        .tenant_id
        .map(|t| format!("tenant {t}"))
        .unwrap_or_else(|| "admin".into());
    Ok(CreatedKey {
        description: format!("{} ({scope})", key.id),
        id: key.id,
        token: token.token,
    })
}

/// Where the servers of a process listen, for the banner.
pub struct Endpoints {
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
}

/// On an embedded installation whose first admin key was never shown, creates one and
/// prints it with the first-start banner (see the module comment).
pub async fn show_first_admin_key(
    store: &dyn RegistryStore,
    data_dir: &Path,
    at: &Endpoints,
    loopback_allowed: bool,
) -> anyhow::Result<()> {
    let marker = Marker(data_dir.join(FIRST_KEY_MARKER));
    match marker.read()? {
        Some(State::Shown) => return Ok(()),
        Some(State::Pending(id)) => revoke_unshown(store, &id).await?,
        None => {}
    }
    if has_live_admin_key(store).await? {
        // Admins made their own keys (`admin create-key`): nothing to hand out.
        return marker.write(SHOWN);
    }
    let id = Id::new(IdKind::ApiKey);
    marker.write(&format!("pending {id}"))?;
    let key = store_key(store, id, FIRST_KEY_NAME, None).await?;
    if announce(&first_start_banner(at, &key.token, loopback_allowed)) {
        marker.write(SHOWN)
    } else {
        // Nobody saw it: revoke it now; the next start shows a new one.
        tracing::warn!(key = %key.id, "cannot print the first admin key (stdout is closed); it is revoked and the next start shows a new one");
        revoke_unshown(store, &key.id).await
    }
}

async fn revoke_unshown(store: &dyn RegistryStore, id: &Id) -> anyhow::Result<()> {
    match store.revoke_api_key(id).await {
        Ok(_) => {
            tracing::warn!(key = %id, "revoked the first admin key, which was never shown");
            Ok(())
        }
        // Never created: the process stopped between the marker and the key.
        Err(StoreError::NotFound { .. }) => Ok(()),
        Err(e) => Err(e).context("revoking the first admin key, which was never shown"),
    }
}

async fn has_live_admin_key(store: &dyn RegistryStore) -> anyhow::Result<bool> {
    let mut page = PageRequest::first_of_max();
    loop {
        let keys = store
            .list_api_keys(None, &page)
            .await
            .context("listing the admin keys")?;
        if keys.items.iter().any(|k| k.revoked_at.is_none()) {
            return Ok(true);
        }
        match keys.next_cursor {
            Some(next) => page.after = Some(next),
            None => return Ok(false),
        }
    }
}

enum State {
    Shown,
    Pending(Id),
}

/// The marker file of the first admin key.
struct Marker(PathBuf);

impl Marker {
    /// The state it records; `None` when there is none (or it cannot be understood).
    fn read(&self) -> anyhow::Result<Option<State>> {
        let text = match std::fs::read_to_string(&self.0) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.0.display())),
        };
        let text = text.trim();
        if text == SHOWN {
            return Ok(Some(State::Shown));
        }
        Ok(text
            .strip_prefix("pending ")
            .and_then(|id| Id::parse(IdKind::ApiKey, "key", id).ok())
            .map(State::Pending))
    }

    /// Replaces the marker (write beside it, then rename: never half a marker).
    fn write(&self, state: &str) -> anyhow::Result<()> {
        let tmp = self.0.with_extension("tmp");
        std::fs::write(&tmp, format!("{state}\n"))
            .and_then(|()| std::fs::rename(&tmp, &self.0))
            .with_context(|| format!("writing {}", self.0.display()))
    }
}

/// What a newcomer sees on the first start of an embedded Hookline: where everything
/// listens, the admin key (shown this once), and commands to paste.
fn first_start_banner(at: &Endpoints, token: &str, loopback_allowed: bool) -> String {
    let Endpoints { grpc, admin } = at;
    let allowed = if loopback_allowed {
        "127.0.0.1 is allowed"
    } else {
        "127.0.0.1 is refused"
    };
    format!(
        r#"
Hookline is running (embedded: every service in this process, state in SQLite).
  gRPC API (registry, ingest, deliveries): {grpc}   reflection on: grpcurl -plaintext {grpc} list
  admin HTTP: http://{admin}/healthz  /readyz  /metrics

First start: an admin API key was created. It is shown only now; keep it:
  {token}

Receivers on this machine: the egress policy refuses loopback and private addresses by
default (tenants must not reach your admin port or database). For a local receiver, start
the server with HOOKLINE_EGRESS_ALLOW=127.0.0.1/32 (now: {allowed}).

Try it (in another terminal, with a receiver listening on http://127.0.0.1:8000/webhook):
  export HOOKLINE_SERVER=http://{grpc} HOOKLINE_TOKEN={token}
  hookline tenants create --name acme                                   # prints ten_…
  hookline subscriptions create --tenant ten_… --url http://127.0.0.1:8000/webhook --event-type 'invoice.*'
  hookline publish --tenant ten_… --type invoice.paid --data '{{"amount": 42}}'
  hookline tail --tenant ten_…
(`hookline` is `cargo run --release -p hookline --` from a checkout.)
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use hookline_store::SqliteStore;

    async fn installation() -> (SqliteStore, PathBuf) {
        let dir = std::env::temp_dir().join(format!("hookline-keys-{}", Id::new(IdKind::ApiKey)));
        std::fs::create_dir_all(&dir).unwrap();
        let store = SqliteStore::open(&dir.join("hookline.db")).await.unwrap();
        store.migrate().await.unwrap();
        (store, dir)
    }

    fn endpoints() -> Endpoints {
        Endpoints {
            grpc: ([127, 0, 0, 1], 50051).into(),
            admin: ([127, 0, 0, 1], 9090).into(),
        }
    }

    async fn live_admin_keys(store: &SqliteStore) -> Vec<Id> {
        let page = PageRequest {
            after: None,
            limit: 100,
        };
        let keys = store.list_api_keys(None, &page).await.unwrap().items;
        keys.into_iter()
            .filter(|k| k.revoked_at.is_none())
            .map(|k| k.id)
            .collect()
    }

    #[tokio::test]
    async fn a_key_created_but_never_shown_is_revoked_and_replaced() {
        let (store, dir) = installation().await;
        // A start that died between creating the key and printing it.
        let unshown = Id::new(IdKind::ApiKey);
        Marker(dir.join(FIRST_KEY_MARKER))
            .write(&format!("pending {unshown}"))
            .unwrap();
        store_key(&store, unshown.clone(), FIRST_KEY_NAME, None)
            .await
            .unwrap();

        show_first_admin_key(&store, &dir, &endpoints(), false)
            .await
            .unwrap();
        let live = live_admin_keys(&store).await;
        assert_eq!(live.len(), 1);
        assert_ne!(live[0], unshown, "the unshown key is revoked");
        let marker = std::fs::read_to_string(dir.join(FIRST_KEY_MARKER)).unwrap();
        assert_eq!(marker.trim(), SHOWN);

        // Shown once: later starts make no key.
        show_first_admin_key(&store, &dir, &endpoints(), false)
            .await
            .unwrap();
        assert_eq!(live_admin_keys(&store).await, live);
        store.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn an_installation_with_admin_keys_gets_no_first_key() {
        let (store, dir) = installation().await;
        let own = create_key(&store, "ops", None).await.unwrap();
        show_first_admin_key(&store, &dir, &endpoints(), false)
            .await
            .unwrap();
        assert_eq!(live_admin_keys(&store).await, vec![own.id]);
        let marker = std::fs::read_to_string(dir.join(FIRST_KEY_MARKER)).unwrap();
        assert_eq!(marker.trim(), SHOWN);
        store.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }
}
