//! What a run measures: a `hookline serve` the bench starts itself, or a running server.
//!
//! Spawned (the default): the bench runs this very binary (`current_exe`) as
//! `hookline serve --services all` on free ports, passing its whole environment through,
//! so `HOOKLINE_*` settings apply to the server under test exactly as they would to a
//! server started by hand. For a clean run it gives the server fresh storage: with a
//! PostgreSQL URL a new database `hookline_bench_<ulid>` on that server, with a RabbitMQ
//! URL a new queue prefix `bench_<ulid>`, and with neither (the embedded backends) a fresh
//! temporary directory as working directory and `HOOKLINE_DATA_DIR`. `hookline migrate`
//! then `hookline admin create-key` with the same environment make the API key. Afterwards the server is stopped with SIGTERM and,
//! unless `--keep`, the database is dropped, the queues deleted and the directory removed.
//!
//! `--server URL --token T`: a running server or cluster; the bench makes its own tenant
//! and deletes it afterwards unless `--keep`. Process figures only for `--pid`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use hookline_proto::v1 as pb;
use hookline_proto::v1::registry_service_client::RegistryServiceClient;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use ulid::Ulid;
use url::Url;

use crate::procstat::Watched;
use crate::{BenchError, BenchOptions};

/// How long `hookline serve` may take to listen and be ready.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long it may take to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A server to benchmark.
pub struct Target {
    /// `http://host:port` of the gRPC API.
    pub grpc: String,
    /// An admin API key.
    pub token: String,
    /// `host:port` of a spawned server's admin HTTP endpoint (`/metrics`, `/readyz`).
    pub admin: Option<String>,
    /// Processes whose CPU and memory are reported.
    pub processes: Vec<Watched>,
    /// `spawned` or `server`.
    pub kind: &'static str,
    /// What an `https://` server is trusted with and shown (--ca, --client-cert/-key).
    pub tls: hookline_client::TlsOptions,
    /// The storage and broker the server uses, for people (no credentials).
    pub backend: String,
    spawned: Option<Spawned>,
}

struct Spawned {
    /// None until `hookline serve` started.
    child: Option<Child>,
    fresh_db: Option<FreshDb>,
    fresh_queues: Option<(String, String)>,
    workdir: Option<PathBuf>,
}

struct FreshDb {
    /// The `postgres` maintenance database of the same server.
    admin_url: String,
    name: String,
}

impl Target {
    /// Spawns a server or connects to `--server`, as the flags say.
    pub async fn start(args: &BenchOptions) -> Result<Target, BenchError> {
        if args.spawn || args.server.is_empty() {
            spawn(args).await
        } else {
            remote(args)
        }
    }

    /// The maintenance URL and the name of a spawned server's fresh PostgreSQL database.
    pub fn fresh_database(&self) -> Option<(&str, &str)> {
        let db = self.spawned.as_ref()?.fresh_db.as_ref()?;
        Some((db.admin_url.as_str(), db.name.as_str()))
    }

    /// Stops a spawned server and removes what the run made, unless `cleanup` is false.
    /// Returns notes for people; cleanup problems are notes, not errors.
    pub async fn finish(&mut self, cleanup: bool, tenant: Option<&str>) -> Vec<String> {
        let mut notes = Vec::new();
        let Some(sp) = self.spawned.as_mut() else {
            if let (true, Some(tenant)) = (cleanup, tenant) {
                match delete_tenant(self, tenant).await {
                    Ok(()) => {}
                    Err(e) => notes.push(format!("could not delete tenant {tenant}: {e}")),
                }
            } else if let Some(tenant) = tenant {
                notes.push(format!("kept tenant {tenant}"));
            }
            return notes;
        };
        if let Some(child) = sp.child.as_mut() {
            stop_child(child, &mut notes).await;
        }
        if let Some(db) = &sp.fresh_db {
            if cleanup {
                if let Err(e) = drop_database(&db.admin_url, &db.name).await {
                    notes.push(format!("could not drop database {}: {e}", db.name));
                }
            } else {
                notes.push(format!("kept database {}", db.name));
            }
        }
        if let Some((amqp, prefix)) = &sp.fresh_queues {
            if cleanup {
                if let Err(e) = delete_queues(amqp, prefix).await {
                    notes.push(format!(
                        "could not delete the queues of prefix {prefix}: {e}"
                    ));
                }
            } else {
                notes.push(format!("kept the queues of prefix {prefix}"));
            }
        }
        if let Some(dir) = &sp.workdir {
            if cleanup {
                if let Err(e) = std::fs::remove_dir_all(dir) {
                    notes.push(format!("could not remove {}: {e}", dir.display()));
                }
            } else {
                notes.push(format!(
                    "kept the server's working directory {}",
                    dir.display()
                ));
            }
        }
        notes
    }
}

fn remote(args: &BenchOptions) -> Result<Target, BenchError> {
    let Some(token) = args.token.clone() else {
        return Err(BenchError::Usage(
            "--server needs an admin API key: pass --token or set HOOKLINE_TOKEN".into(),
        ));
    };
    let tls = hookline_client::TlsOptions::from_files(
        args.ca.as_deref(),
        args.client_cert.as_deref(),
        args.client_key.as_deref(),
    )
    .map_err(|e| BenchError::Usage(e.to_string()))?;
    Ok(Target {
        tls,
        grpc: args.server.clone(),
        token,
        admin: None,
        processes: watched_pids(&args.pids),
        kind: "server",
        backend: format!("running server at {}", args.server),
        spawned: None,
    })
}

fn watched_pids(pids: &[u32]) -> Vec<Watched> {
    pids.iter()
        .map(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim().to_string())
                .unwrap_or_else(|_| "?".into());
            Watched {
                label: format!("pid {pid} ({comm})"),
                pid: *pid,
            }
        })
        .collect()
}

/// `host:port/db` of a URL, without credentials.
fn describe_url(url: &Url) -> String {
    format!(
        "{}:{}{}",
        url.host_str().unwrap_or("?"),
        url.port().map(|p| p.to_string()).unwrap_or_default(),
        url.path()
    )
}

/// The receiver's address as an `egress_allow` range (an unspecified bind address is
/// reached on loopback).
fn receiver_range(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) if v4.is_unspecified() => "127.0.0.1/32".into(),
        std::net::IpAddr::V6(v6) if v6.is_unspecified() => "::1/128".into(),
        std::net::IpAddr::V4(v4) => format!("{v4}/32"),
        std::net::IpAddr::V6(v6) => format!("{v6}/128"),
    }
}

/// Starts `hookline serve` (after `migrate` and `admin create-key`) on fresh storage
/// unless `--no-fresh`; on failure, what was made is removed again.
async fn spawn(args: &BenchOptions) -> Result<Target, BenchError> {
    let exe = match &args.server_exe {
        Some(exe) => exe.clone(),
        None => std::env::current_exe()
            .map_err(|e| BenchError::io("finding the hookline binary (current_exe)", e))?,
    };
    let id = Ulid::new().to_string().to_lowercase();
    let mut backing = Backing::default();
    backing.database(args, &id)?;
    backing.queues(args, &id);
    backing.env.extend(server_env(args));
    let (env, workdir) = (&backing.env, &backing.workdir);
    let command = |sub: &[&str]| {
        let mut cmd = Command::new(&exe);
        cmd.args(sub)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Some(dir) = workdir {
            cmd.current_dir(dir);
        }
        cmd
    };
    let started = start(&exe, command).await;
    let mut spawned = Spawned {
        child: None,
        fresh_db: backing.fresh_db,
        fresh_queues: backing.fresh_queues,
        workdir: backing.workdir,
    };
    let (token, child) = match started {
        Ok(v) => v,
        Err(e) => {
            return give_up(
                spawned_target(String::new(), Vec::new(), String::new(), spawned),
                e,
            )
            .await;
        }
    };
    let pid = child.id().unwrap_or(0);
    spawned.child = Some(child);
    let processes = std::iter::once(Watched {
        label: format!("hookline serve (pid {pid})"),
        pid,
    })
    .chain(watched_pids(&args.pids))
    .collect();
    let mut target = spawned_target(token, processes, backing.backend.join(", "), spawned);
    match wait_listening(target.spawned.as_mut().and_then(|s| s.child.as_mut())).await {
        Ok((grpc, admin)) => {
            target.grpc = grpc;
            target.admin = Some(admin);
            Ok(target)
        }
        Err(e) => give_up(target, e).await,
    }
}

/// A spawned target not yet known to listen.
fn spawned_target(
    token: String,
    processes: Vec<Watched>,
    backend: String,
    spawned: Spawned,
) -> Target {
    Target {
        grpc: String::new(),
        token,
        admin: None,
        processes,
        kind: "spawned",
        tls: Default::default(),
        backend,
        spawned: Some(spawned),
    }
}

/// Stops and cleans up a target that failed to start, then returns its error.
async fn give_up(mut target: Target, e: BenchError) -> Result<Target, BenchError> {
    for note in target.finish(true, None).await {
        eprintln!("hookline bench: {note}");
    }
    Err(e)
}

/// `migrate`, `admin create-key` and `serve`, with `command` making each command;
/// returns the key and the server process.
async fn start(
    exe: &std::path::Path,
    command: impl Fn(&[&str]) -> Command,
) -> Result<(String, Child), BenchError> {
    // `admin create-key` needs an existing store; `migrate` makes it.
    run_once(command(&["migrate"]), "hookline migrate").await?;
    let token = create_key(command(&[
        "admin",
        "create-key",
        "--name",
        "hookline-bench",
    ]))
    .await?;
    let mut serve = command(&[
        "serve",
        "--services",
        "all",
        "--grpc-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
    ]);
    serve.stdout(Stdio::piped()).stderr(Stdio::inherit());
    let child = serve
        .spawn()
        .map_err(|e| BenchError::io(format!("starting {} serve", exe.display()), e))?;
    Ok((token, child))
}

/// Where the spawned server keeps its data: its environment, a description, and what
/// was made fresh (to remove afterwards).
#[derive(Default)]
struct Backing {
    env: Vec<(&'static str, String)>,
    backend: Vec<String>,
    fresh_db: Option<FreshDb>,
    fresh_queues: Option<(String, String)>,
    workdir: Option<PathBuf>,
}

impl Backing {
    /// `--database-url`: a fresh PostgreSQL database next to the given one unless
    /// `--no-fresh`; without it, the embedded backends in a fresh directory.
    fn database(&mut self, args: &BenchOptions, id: &str) -> Result<(), BenchError> {
        let fresh = !args.no_fresh;
        let Some(raw) = &args.database_url else {
            if fresh {
                // The embedded backends keep their files in HOOKLINE_DATA_DIR (by default
                // relative to the working directory): a fresh directory is fresh storage.
                let dir = std::env::temp_dir().join(format!("hookline_bench_{id}"));
                std::fs::create_dir_all(&dir)
                    .map_err(|e| BenchError::io(format!("creating {}", dir.display()), e))?;
                let data = dir.join("data");
                self.backend
                    .push(format!("embedded backends in {} (fresh)", data.display()));
                self.env
                    .push(("HOOKLINE_DATA_DIR", data.display().to_string()));
                self.workdir = Some(dir);
            } else if args.amqp_url.is_none() {
                self.backend
                    .push("embedded backends in the server's data_dir".into());
            }
            return Ok(());
        };
        let url = Url::parse(raw).ok();
        match url.filter(|u| fresh && matches!(u.scheme(), "postgres" | "postgresql")) {
            Some(url) => {
                let name = format!("hookline_bench_{id}");
                let (mut db, mut admin) = (url.clone(), url);
                db.set_path(&format!("/{name}"));
                admin.set_path("/postgres");
                self.backend
                    .push(format!("PostgreSQL {} (fresh)", describe_url(&db)));
                self.env.push(("HOOKLINE_DATABASE_URL", db.to_string()));
                self.fresh_db = Some(FreshDb {
                    admin_url: admin.to_string(),
                    name,
                });
            }
            None => {
                self.backend.push(match Url::parse(raw) {
                    Ok(u) => format!("database {} {}", u.scheme(), describe_url(&u)),
                    Err(_) => "the configured database".into(),
                });
                self.env.push(("HOOKLINE_DATABASE_URL", raw.clone()));
            }
        }
        Ok(())
    }

    /// `--amqp-url`: RabbitMQ with a fresh queue prefix unless `--no-fresh`.
    fn queues(&mut self, args: &BenchOptions, id: &str) {
        let Some(amqp) = &args.amqp_url else {
            return;
        };
        self.env.push(("HOOKLINE_AMQP_URL", amqp.clone()));
        if args.no_fresh {
            self.backend
                .push("RabbitMQ with the configured queue prefix".into());
            return;
        }
        let prefix = format!("bench_{id}");
        self.env.push(("HOOKLINE_QUEUE_PREFIX", prefix.clone()));
        self.backend.push(match Url::parse(amqp) {
            Ok(u) => format!("RabbitMQ {} prefix {prefix} (fresh)", describe_url(&u)),
            Err(_) => format!("RabbitMQ prefix {prefix} (fresh)"),
        });
        self.fresh_queues = Some((amqp.clone(), prefix));
    }
}

/// The rest of the server's environment: the config file, a quiet log unless one is
/// set, and an egress policy that lets deliveries reach the bench's receiver.
fn server_env(args: &BenchOptions) -> Vec<(&'static str, String)> {
    let mut env = Vec::new();
    if let Some(config) = &args.config {
        env.push(("HOOKLINE_CONFIG", config.display().to_string()));
    }
    if std::env::var_os("HOOKLINE_LOG").is_none() {
        env.push(("HOOKLINE_LOG", "warn".into()));
    }
    // The bench's receiver listens on loopback (or another local address), which the
    // egress policy refuses by default: allow exactly its address, on top of whatever
    // the environment allows.
    let receiver = receiver_range(args.receiver_addr.ip());
    let allow = match std::env::var("HOOKLINE_EGRESS_ALLOW") {
        Ok(given) if !given.trim().is_empty() => format!("{given},{receiver}"),
        _ => receiver,
    };
    env.push(("HOOKLINE_EGRESS_ALLOW", allow));
    env
}

/// Runs a one-shot `hookline` command (`what`, for messages); returns its stdout.
async fn run_once(mut cmd: Command, what: &str) -> Result<String, BenchError> {
    let out = tokio::time::timeout(START_TIMEOUT, cmd.output())
        .await
        .map_err(|_| BenchError::Server(format!("`{what}` took over 60 s")))?
        .map_err(|e| BenchError::io(format!("running `{what}`"), e))?;
    if !out.status.success() {
        return Err(BenchError::Server(format!(
            "`{what}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `hookline admin create-key` and returns the token it printed.
async fn create_key(cmd: Command) -> Result<String, BenchError> {
    let stdout = run_once(cmd, "hookline admin create-key").await?;
    stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with("hl_"))
        .map(str::to_string)
        .ok_or_else(|| {
            BenchError::Server(format!(
                "`hookline admin create-key` printed no token: {stdout:?}"
            ))
        })
}

/// Reads the server's `listening on` lines, then waits for `/readyz`; returns the gRPC URL
/// and the admin address.
async fn wait_listening(child: Option<&mut Child>) -> Result<(String, String), BenchError> {
    let Some(child) = child else {
        return Err(BenchError::Server("no server process".into()));
    };
    let Some(stdout) = child.stdout.take() else {
        return Err(BenchError::Server(
            "the server's stdout is not piped".into(),
        ));
    };
    let mut lines = BufReader::new(stdout).lines();
    let (mut grpc, mut admin) = (None, None);
    let read = async {
        while grpc.is_none() || admin.is_none() {
            match lines.next_line().await {
                Ok(Some(line)) => {
                    if let Some(a) = line.strip_prefix("hookline: grpc listening on ") {
                        grpc = Some(a.trim().to_string());
                    }
                    if let Some(a) = line.strip_prefix("hookline: admin listening on ") {
                        admin = Some(a.trim().to_string());
                    }
                }
                Ok(None) => {
                    return Err(BenchError::Server(
                        "`hookline serve` exited before listening (its errors are above)".into(),
                    ));
                }
                Err(e) => return Err(BenchError::io("reading the server's stdout", e)),
            }
        }
        Ok(())
    };
    tokio::time::timeout(START_TIMEOUT, read)
        .await
        .map_err(|_| BenchError::Server("`hookline serve` did not listen within 60 s".into()))??;
    // Keep draining stdout so the server never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let (Some(grpc), Some(admin)) = (grpc, admin) else {
        return Err(BenchError::Server(
            "`hookline serve` printed no addresses".into(),
        ));
    };
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        if http_status(&admin, "/readyz").await == Some(200) {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(BenchError::Server(format!(
                "`hookline serve` was not ready (http://{admin}/readyz) within 60 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok((format!("http://{grpc}"), admin))
}

/// The status code of a plain HTTP GET, or None if there was no answer.
async fn http_status(addr: &str, path: &str) -> Option<u16> {
    http_get(addr, path).await.map(|(status, _)| status)
}

/// Status and body of a plain HTTP/1.0 GET (so never chunked), or None if there was no
/// answer within 5 s.
pub(crate) async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let get = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        stream.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf);
        let status = text.split(' ').nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
        Some((status, body.unwrap_or_default()))
    };
    tokio::time::timeout(Duration::from_secs(5), get)
        .await
        .ok()
        .flatten()
}

/// The sum of every sample of counter `name` on a spawned server's `/metrics`.
pub(crate) async fn metric_sum(target: &Target, name: &str) -> Option<f64> {
    let (status, body) = http_get(target.admin.as_deref()?, "/metrics").await?;
    if status != 200 {
        return None;
    }
    let mut sum = None;
    for line in body.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

/// SIGTERM, then a kill if the server has not stopped within [`STOP_TIMEOUT`].
async fn stop_child(child: &mut Child, notes: &mut Vec<String>) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: kill(2) with a pid of our own child that has not been reaped yet (it
        // is reaped only through `child`), so the pid cannot have been reused.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    match tokio::time::timeout(STOP_TIMEOUT, child.wait()).await {
        Ok(Ok(status)) if status.success() => {}
        Ok(Ok(status)) => notes.push(format!("`hookline serve` exited with {status}")),
        Ok(Err(e)) => notes.push(format!("waiting for `hookline serve`: {e}")),
        Err(_) => {
            notes.push(format!(
                "`hookline serve` did not stop within {} s of SIGTERM; killed",
                STOP_TIMEOUT.as_secs()
            ));
            let _ = child.kill().await;
        }
    }
}

async fn drop_database(admin_url: &str, name: &str) -> Result<(), String> {
    use sqlx::{Connection, Executor};
    let mut conn = sqlx::PgConnection::connect(admin_url)
        .await
        .map_err(|e| e.to_string())?;
    // The name is ours (`hookline_bench_` + lowercase ULID), so quoting is enough.
    let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
    let result = conn.execute(sqlx::AssertSqlSafe(sql)).await;
    let _ = conn.close().await;
    result.map(|_| ()).map_err(|e| e.to_string())
}

async fn delete_queues(amqp_url: &str, prefix: &str) -> Result<(), String> {
    let work = async {
        let cfg = hookline_broker::RabbitConfig::new(amqp_url, prefix);
        let broker = hookline_broker::RabbitBroker::connect(cfg)
            .await
            .map_err(|e| e.to_string())?;
        let result = broker.delete_topology().await.map_err(|e| e.to_string());
        broker.close().await;
        result
    };
    tokio::time::timeout(Duration::from_secs(30), work)
        .await
        .map_err(|_| "timed out after 30 s".to_string())?
}

/// Deletes a second tenant of a run on a running server (`finish` deletes the first);
/// a spawned server's storage goes as a whole. Returns notes for people.
pub(crate) async fn delete_other_tenant(target: &Target, tenant: &str) -> Vec<String> {
    if target.spawned.is_some() {
        return Vec::new();
    }
    match delete_tenant(target, tenant).await {
        Ok(()) => Vec::new(),
        Err(e) => vec![format!("could not delete tenant {tenant}: {e}")],
    }
}

async fn delete_tenant(target: &Target, tenant: &str) -> Result<(), String> {
    let (grpc, token) = (&target.grpc, &target.token);
    let auth = format!("Bearer {token}")
        .parse()
        .map_err(|_| "the API key cannot go in a header".to_string())?;
    let work = async {
        let channel = crate::connect(grpc, &target.tls)
            .await
            .map_err(|e| e.to_string())?;
        RegistryServiceClient::new(channel)
            .delete_tenant(crate::authed(
                pb::DeleteTenantRequest {
                    tenant_id: tenant.to_string(),
                },
                &auth,
            ))
            .await
            .map(|_| ())
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    };
    tokio::time::timeout(Duration::from_secs(120), work)
        .await
        .map_err(|_| "timed out after 120 s".to_string())?
}
