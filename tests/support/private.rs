//! Private PostgreSQL and RabbitMQ servers for the fault tests.
//!
//! The fault tests stop and restart their database and broker. The machine's shared
//! servers belong to every other test running in parallel, so these tests start servers
//! of their own: a PostgreSQL cluster made by `initdb` in a temporary directory and a
//! RabbitMQ node with its own name, ports and directories. Both listen on loopback ports
//! picked free at start, and both are stopped and their directories removed on `Drop`,
//! whatever happens to the test.
//!
//! Run as root (as CI here does), PostgreSQL is run as the `postgres` user (it refuses
//! root) and RabbitMQ is started from `/usr/lib/rabbitmq/bin`, skipping the Debian
//! wrapper that would switch to the `rabbitmq` user and lose the environment.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A loopback port nobody listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn temp_dir(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(hookline_testkit::unique_name(prefix));
    std::fs::create_dir_all(&dir).expect("create a temporary directory");
    dir
}

/// Runs `cmd`, panicking with its output if it fails.
fn run(mut cmd: Command, what: &str) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A PostgreSQL cluster of the test's own.
pub struct PrivatePostgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
    /// How long `initdb` and the first start took.
    pub started_in: Duration,
}

impl PrivatePostgres {
    /// `initdb` into a temporary directory, then starts the server on a free port.
    pub fn start() -> PrivatePostgres {
        Self::start_with(|_| {})
    }

    /// [`start`](Self::start) with `ssl = on`, serving `leaf` (made for 127.0.0.1).
    pub fn start_tls(leaf: &super::pki::Leaf) -> PrivatePostgres {
        Self::start_with(|pg| {
            let data = pg.dir.join("data");
            std::fs::write(data.join("server.crt"), &leaf.cert).expect("write server.crt");
            let key = data.join("server.key");
            std::fs::write(&key, &leaf.key).expect("write server.key");
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
                .expect("chmod server.key");
            if pg.as_postgres {
                let owner = std::fs::metadata(&pg.dir).map(|m| {
                    use std::os::unix::fs::MetadataExt;
                    m.uid()
                });
                for f in ["server.crt", "server.key"] {
                    std::os::unix::fs::chown(data.join(f), owner.as_ref().ok().copied(), None)
                        .expect("chown the TLS files");
                }
            }
            let mut conf = std::fs::OpenOptions::new()
                .append(true)
                .open(data.join("postgresql.conf"))
                .expect("open postgresql.conf");
            use std::io::Write;
            writeln!(
                conf,
                "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'"
            )
            .expect("enable ssl");
        })
    }

    /// A URL that requires TLS and checks the server's certificate against `root`.
    pub fn url_verify_full(&self, root: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={root}",
            self.port
        )
    }

    fn start_with(configure: impl FnOnce(&PrivatePostgres)) -> PrivatePostgres {
        let started = Instant::now();
        let bin = postgres_bin();
        let dir = temp_dir("hookline-pg-");
        let as_postgres = running_as_root();
        if as_postgres {
            let uid = Command::new("id")
                .args(["-u", "postgres"])
                .output()
                .ok()
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .and_then(|s| s.trim().parse::<u32>().ok())
                .expect("running as root needs a `postgres` user to run PostgreSQL as");
            std::os::unix::fs::chown(&dir, Some(uid), None).expect("chown the cluster directory");
        }
        let mut pg = PrivatePostgres {
            dir,
            bin,
            port: free_port(),
            as_postgres,
            started_in: Duration::ZERO,
        };
        let data = pg.dir.join("data");
        let mut initdb = pg.tool("initdb");
        initdb.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
        ]);
        run(initdb, "initdb");
        configure(&pg);
        pg.start_again();
        pg.started_in = started.elapsed();
        pg
    }

    /// The URL to give Hookline.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    fn tool(&self, name: &str) -> Command {
        let path = self.bin.join(name);
        if self.as_postgres {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(path);
            cmd
        } else {
            Command::new(path)
        }
    }

    fn pg_ctl(&self, args: &[&str]) -> Command {
        let mut cmd = self.tool("pg_ctl");
        cmd.arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("log"))
            .arg("-w")
            .args(args);
        cmd
    }

    /// Stops the server at once (`-m immediate`: like a crash, connections cut).
    pub fn stop(&self) {
        run(self.pg_ctl(&["-m", "immediate", "stop"]), "pg_ctl stop");
    }

    /// Starts the (stopped) server again on the same port.
    pub fn start_again(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.dir.display()
        );
        run(self.pg_ctl(&["-o", &options, "start"]), "pg_ctl start");
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self
            .pg_ctl(&["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `HOOKLINE_TEST_PG_BIN`, or the newest `/usr/lib/postgresql/*/bin` holding `initdb`.
fn postgres_bin() -> PathBuf {
    postgres_bin_if_any().expect(
        "no PostgreSQL server binaries in /usr/lib/postgresql/*/bin; set HOOKLINE_TEST_PG_BIN",
    )
}

/// [`postgres_bin`], or `None` when this machine has no PostgreSQL server binaries.
pub fn postgres_bin_if_any() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("HOOKLINE_TEST_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("initdb").is_file())
        .collect();
    found.sort();
    found.pop()
}

/// A RabbitMQ node of the test's own.
pub struct PrivateRabbit {
    dir: PathBuf,
    node: String,
    port: u16,
    /// How long the node took to start and be ready.
    pub started_in: Duration,
}

/// How long a node may take to start (the first start creates its database).
const RABBIT_START: Duration = Duration::from_secs(90);

impl PrivateRabbit {
    /// Starts a detached node on free ports and waits until it is ready.
    pub fn start() -> PrivateRabbit {
        let started = Instant::now();
        let dir = temp_dir("hookline-mq-");
        let name = hookline_testkit::unique_name("hlfault");
        let mut mq = PrivateRabbit {
            node: format!("{name}@localhost"),
            port: free_port(),
            dir,
            started_in: Duration::ZERO,
        };
        std::fs::write(mq.dir.join("enabled_plugins"), "").expect("write the plugins file");
        std::fs::write(mq.dir.join("rabbitmq-env.conf"), "").expect("write the env file");
        std::fs::write(
            mq.dir.join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{}\n", mq.port),
        )
        .expect("write the node configuration");
        let mut server = mq.tool("rabbitmq-server");
        server
            .env("RABBITMQ_NODE_PORT", mq.port.to_string())
            .env("RABBITMQ_DIST_PORT", free_port().to_string())
            .env("RABBITMQ_MNESIA_BASE", mq.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", mq.dir.join("log"))
            .env("RABBITMQ_PID_FILE", mq.dir.join("pid"))
            .arg("-detached");
        run(server, "rabbitmq-server -detached");
        mq.await_startup();
        mq.started_in = started.elapsed();
        mq
    }

    /// The URL to give Hookline.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// A RabbitMQ script with this node's environment (its own cookie in `HOME`).
    fn tool(&self, name: &str) -> Command {
        let system = Path::new("/usr/lib/rabbitmq/bin").join(name);
        let mut cmd = Command::new(if system.is_file() {
            system
        } else {
            PathBuf::from(name)
        });
        cmd.env("HOME", &self.dir)
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_CONF_ENV_FILE", self.dir.join("rabbitmq-env.conf"))
            .env("RABBITMQ_CONFIG_FILE", self.dir.join("rabbitmq.conf"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.dir.join("enabled_plugins"),
            )
            .env("ERL_EPMD_ADDRESS", "127.0.0.1");
        cmd
    }

    fn ctl(&self, args: &[&str]) -> Command {
        let mut cmd = self.tool("rabbitmqctl");
        cmd.args(["-q", "-n", &self.node]).args(args);
        cmd
    }

    /// Waits until the node's application runs (a detached node registers a moment after
    /// the start command returns, so the first attempts may not find it).
    fn await_startup(&self) {
        let deadline = Instant::now() + RABBIT_START;
        loop {
            let ok = self
                .ctl(&["await_startup", "--timeout", "30"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "private RabbitMQ node {} did not start within {RABBIT_START:?}; see {}",
                self.node,
                self.dir.join("log").display()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Stops the RabbitMQ application (connections close, the port stops listening);
    /// the node's runtime stays up.
    pub fn stop_app(&self) {
        run(self.ctl(&["stop_app"]), "rabbitmqctl stop_app");
    }

    /// Starts the application again and waits until it is ready.
    pub fn start_app(&self) {
        run(self.ctl(&["start_app"]), "rabbitmqctl start_app");
        self.await_startup();
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        let stopped = self
            .ctl(&["stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !stopped {
            // The node did not answer: end its runtime by the pid it wrote, and only that.
            if let Ok(pid) = std::fs::read_to_string(self.dir.join("pid")) {
                let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
