//! Running the `hookline` client commands against a test server, as a user would: one
//! server, one key, `--json` output parsed.

use std::time::Duration;

use serde_json::Value;

use super::receiver::{Behavior, Receiver};
use super::{Env, Server};

/// Runs client commands against one server with one key.
pub struct Cli<'a> {
    pub env: &'a Env,
    /// `host:port`, the form `hookline serve` prints.
    pub server: String,
    pub token: String,
}

impl<'a> Cli<'a> {
    pub async fn start(env: &'a Env) -> (Cli<'a>, Server) {
        let token = env.admin_key().await;
        let server = env.serve("all").await;
        let addr = server.grpc.trim_start_matches("http://").to_string();
        (
            Cli {
                env,
                server: addr,
                token,
            },
            server,
        )
    }

    pub async fn output(&self, args: &[&str]) -> std::process::Output {
        self.env
            .command()
            .args(args)
            .args(["--server", &self.server, "--token", &self.token])
            .output()
            .await
            .unwrap_or_else(|e| panic!("run hookline {args:?}: {e}"))
    }

    /// Runs `hookline <args> --json`, requires success and parses the output.
    pub async fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.output(&all).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "hookline {all:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("hookline {all:?} printed no JSON ({e}): {stdout}"))
    }

    /// Runs `hookline <args>`, requires success, returns stdout.
    pub async fn text(&self, args: &[&str]) -> String {
        let out = self.output(args).await;
        assert!(
            out.status.success(),
            "hookline {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `hookline <args>`, requires failure, returns stderr.
    pub async fn fails(&self, args: &[&str]) -> String {
        let out = self.output(args).await;
        assert!(
            !out.status.success(),
            "hookline {args:?} succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// A new tenant with a subscription to the receiver's endpoint `name`, whose secret
    /// the receiver checks signatures with.
    pub async fn subscribe(
        &self,
        receiver: &Receiver,
        name: &str,
        behavior: Behavior,
    ) -> (String, Value) {
        self.subscribe_with(receiver, name, behavior, &[]).await
    }

    /// [`subscribe`](Self::subscribe) with more `subscriptions create` flags.
    pub async fn subscribe_with(
        &self,
        receiver: &Receiver,
        name: &str,
        behavior: Behavior,
        flags: &[&str],
    ) -> (String, Value) {
        let tenant = self.tenant().await;
        let url = receiver.endpoint(name, behavior);
        let mut create = vec![
            "subscriptions",
            "create",
            "--tenant",
            &tenant,
            "--url",
            &url,
        ];
        create.extend_from_slice(flags);
        let sub = self.json(&create).await;
        receiver.set_secret(name, sub["secret"].as_str().expect("secret"));
        (tenant, sub)
    }

    /// Publishes an empty `a.b` event to `tenant` until it matches one subscription (a
    /// new or re-enabled subscription reaches ingest through the broker); panics after
    /// `secs` seconds.
    pub async fn publish_until_matched(&self, tenant: &str, secs: u64) -> Value {
        let publish = [
            "publish", "--tenant", tenant, "--type", "a.b", "--data", "{}",
        ];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let published = self.json(&publish).await;
            if published["deliveries_created"] == 1 {
                return published;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no subscription matched within {secs} s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn tenant(&self) -> String {
        let t = self.json(&["tenants", "create", "--name", "acme"]).await;
        t["id"].as_str().expect("tenant id").to_string()
    }

    /// Runs `hookline <args> --json` until `done` holds for its output, which it returns;
    /// panics after `secs` seconds, saying what was awaited.
    pub async fn json_until(
        &self,
        args: &[&str],
        secs: u64,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let got = self.json(args).await;
            if done(&got) {
                return got;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{args:?}: not {what} within {secs} s: {got}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
