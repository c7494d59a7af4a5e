//! The external receiver: nginx (Debian `nginx-light`) as a child process, answering every
//! webhook 204 and logging each request, and the tally that reads its access log.
//!
//! nginx runs in the foreground without a master process (`daemon off; master_process
//! off;`), so the one process the bench starts is the one whose CPU it reports. Its
//! configuration and logs live in a fresh temporary directory removed afterwards. The
//! access log line is `$msec $request_uri $http_webhook_id $status`: the arrival time
//! (wall clock, ms), the subscription (`/s/<n>`), the event id and the answer. The log is
//! buffered by nginx (flushed every 250 ms) and read incrementally by [`LogTally`].

use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::process::{Child, Command};
use ulid::Ulid;

use crate::BenchError;
use crate::events::latency_histogram;

/// A running nginx receiver.
pub struct Nginx {
    child: Child,
    dir: PathBuf,
    pub addr: std::net::SocketAddr,
    pub log: PathBuf,
}

/// The configuration: one server on `port`, `return 204`, a buffered access log.
fn config(dir: &Path, port: u16) -> String {
    let d = dir.display();
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
error_log {d}/error.log warn;
pid {d}/nginx.pid;
events {{ worker_connections 8192; }}
http {{
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  log_format hookline '$msec $request_uri $http_webhook_id $status';
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    access_log {d}/access.log hookline buffer=64k flush=250ms;
    location / {{ return 204; }}
  }}
}}
"#
    )
}

/// A port free at the time of asking.
fn free_port() -> Result<u16, BenchError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| BenchError::io("finding a free port for nginx", e))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| BenchError::io("finding a free port for nginx", e))
}

impl Nginx {
    /// Starts nginx (the `nginx` on PATH, or `$HOOKLINE_BENCH_NGINX`) and waits until it
    /// accepts connections.
    pub async fn start() -> Result<Nginx, BenchError> {
        let dir = std::env::temp_dir().join(format!(
            "hookline_bench_nginx_{}",
            Ulid::new().to_string().to_lowercase()
        ));
        std::fs::create_dir_all(&dir)
            .map_err(|e| BenchError::io(format!("creating {}", dir.display()), e))?;
        let port = free_port()?;
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config(&dir, port))
            .map_err(|e| BenchError::io(format!("writing {}", conf.display()), e))?;
        let exe = std::env::var("HOOKLINE_BENCH_NGINX").unwrap_or_else(|_| "nginx".into());
        let child = Command::new(&exe)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                let _ = std::fs::remove_dir_all(&dir);
                BenchError::io(
                    format!(
                        "starting {exe} (install Debian's nginx-light: apt-get install nginx-light)"
                    ),
                    e,
                )
            })?;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let mut nginx = Nginx {
            child,
            log: dir.join("access.log"),
            dir,
            addr,
        };
        nginx.wait_ready().await?;
        Ok(nginx)
    }

    async fn wait_ready(&mut self) -> Result<(), BenchError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return Ok(());
            }
            let exited = matches!(self.child.try_wait(), Ok(Some(_)));
            if exited || tokio::time::Instant::now() >= deadline {
                let log = std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default();
                return Err(BenchError::Server(format!(
                    "nginx did not listen on {} within 10 s: {}",
                    self.addr,
                    log.trim()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Stops nginx (SIGQUIT: it flushes its log and exits) and removes its directory
    /// unless `keep`.
    pub async fn stop(mut self, keep: bool) {
        if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
            // SAFETY: kill(2) on our own child, not yet reaped (only `self.child` reaps it).
            unsafe {
                libc::kill(pid, libc::SIGQUIT);
            }
        }
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
        if !keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// What the access log says so far, read incrementally.
pub struct LogTally {
    file: Option<std::fs::File>,
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    seen: HashSet<(u32, u128)>,
    /// Arrival (Unix ms) of every first delivery.
    pub arrivals_ms: Vec<u64>,
    /// Event id's time (the server's accept, ms) → arrival, per first delivery, in µs.
    pub latency: Histogram<u64>,
    pub duplicates: u64,
    /// Requests answered other than 204 or for no `/s/<n>` path or event id.
    pub unexpected: u64,
}

impl LogTally {
    pub fn new(path: PathBuf) -> LogTally {
        LogTally {
            file: None,
            path,
            offset: 0,
            partial: Vec::new(),
            seen: HashSet::new(),
            arrivals_ms: Vec::new(),
            latency: latency_histogram(),
            duplicates: 0,
            unexpected: 0,
        }
    }

    pub fn delivered(&self) -> u64 {
        self.arrivals_ms.len() as u64
    }

    /// Reads what nginx wrote since the last call.
    pub fn poll(&mut self) {
        if self.file.is_none() {
            self.file = std::fs::File::open(&self.path).ok();
        }
        let Some(file) = self.file.as_mut() else {
            return;
        };
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut buf = std::mem::take(&mut self.partial);
        let Ok(n) = file.read_to_end(&mut buf) else {
            return;
        };
        self.offset += n as u64;
        let complete = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        self.partial = buf.split_off(complete);
        for line in buf.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            self.line(std::str::from_utf8(line).unwrap_or(""));
        }
    }

    fn line(&mut self, line: &str) {
        match parse_line(line) {
            Some((at_ms, sub, key, accepted_ms)) => {
                if self.seen.insert((sub, key)) {
                    self.arrivals_ms.push(at_ms);
                    let us = at_ms.saturating_sub(accepted_ms).saturating_mul(1000);
                    self.latency.saturating_record(us.max(1));
                } else {
                    self.duplicates += 1;
                }
            }
            None => self.unexpected += 1,
        }
    }
}

/// One access-log line: arrival ms, subscription, event key and the event id's ms.
/// None for anything but a 204 to `/s/<n>` with an event id.
fn parse_line(line: &str) -> Option<(u64, u32, u128, u64)> {
    let mut f = line.split(' ');
    let (msec, uri, id, status) = (f.next()?, f.next()?, f.next()?, f.next()?);
    if status != "204" {
        return None;
    }
    let (secs, millis) = msec.split_once('.')?;
    let at_ms = secs.parse::<u64>().ok()? * 1000 + millis.parse::<u64>().ok()?;
    let sub = uri.strip_prefix("/s/")?.parse::<u32>().ok()?;
    let ulid = Ulid::from_string(id.strip_prefix("evt_")?).ok()?;
    Some((at_ms, sub, u128::from(ulid), ulid.timestamp_ms()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_lines_dedupes_and_measures_from_the_event_id() {
        let ulid = Ulid::from_parts(1_700_000_000_000, 42);
        let line = format!("1700000000.015 /s/3 evt_{ulid} 204");
        let (at, sub, key, ms) = parse_line(&line).unwrap();
        assert_eq!(
            (at, sub, key, ms),
            (1_700_000_000_015, 3, u128::from(ulid), 1_700_000_000_000)
        );
        assert!(parse_line(&format!("1700000000.015 /s/3 evt_{ulid} 500")).is_none());
        assert!(parse_line("1700000000.015 /other - 204").is_none());

        let path = std::env::temp_dir().join(format!("hl_tally_{}", Ulid::new()));
        std::fs::write(
            &path,
            format!("{line}\n{line}\n1700000000.016 /s/4 evt_{ulid} 204\n1700"),
        )
        .unwrap();
        let mut t = LogTally::new(path.clone());
        t.poll();
        assert_eq!((t.delivered(), t.duplicates, t.unexpected), (2, 1, 0));
        assert_eq!(t.latency.max() / 1000, 16);
        let _ = std::fs::remove_file(path);
    }
}
