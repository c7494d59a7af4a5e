//! The external load generator: `h2load` (Debian `nghttp2-client`) driving gRPC
//! `Publish` over HTTP/2 cleartext.
//!
//! A gRPC call is an HTTP/2 POST to `/hookline.v1.IngestService/Publish` with
//! `content-type: application/grpc`, `te: trailers`, the API key in `authorization` and a
//! body of one length-prefixed message (1 byte "not compressed", 4 bytes big-endian
//! length, the serialized `PublishRequest`). h2load sends the same body on every request,
//! so every event has the same type and payload; the server gives each its own id. h2load
//! counts HTTP statuses, and gRPC answers errors with HTTP 200 and a `grpc-status`
//! trailer, so the events the server accepted are read from its metrics instead.

use std::path::Path;
use std::process::Stdio;

use hookline_proto::v1 as pb;
use prost::Message;
use serde::Serialize;
use tokio::process::Command;

use crate::BenchError;

/// The gRPC method path of `Publish` (package `hookline.v1`, service `IngestService`).
pub const PUBLISH_PATH: &str = "/hookline.v1.IngestService/Publish";

/// One `Publish` request framed as a gRPC message body.
pub fn publish_body(tenant: &str, event_type: &str, payload_bytes: usize) -> Vec<u8> {
    let frame = r#"{"source":"hookline-bench","pad":""}"#.len();
    let payload = format!(
        r#"{{"source":"hookline-bench","pad":"{}"}}"#,
        "x".repeat(payload_bytes.saturating_sub(frame))
    );
    let msg = pb::PublishRequest {
        tenant_id: tenant.to_string(),
        event_type: event_type.to_string(),
        payload: payload.into_bytes(),
        ..Default::default()
    }
    .encode_to_vec();
    let mut body = Vec::with_capacity(5 + msg.len());
    body.push(0);
    body.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    body.extend_from_slice(&msg);
    body
}

/// How h2load is run.
pub struct LoadSpec<'a> {
    pub url: &'a str,
    pub token: &'a str,
    pub body_file: &'a Path,
    pub connections: usize,
    /// Seconds of load, or a number of requests.
    pub duration_s: Option<f64>,
    pub requests: Option<u64>,
    /// Requests per second in all (open loop), spread over the connections.
    pub rate: Option<f64>,
}

/// What h2load said about its run.
#[derive(Debug, Default, Clone, Serialize)]
pub struct LoadResult {
    pub requests_done: u64,
    pub requests_succeeded: u64,
    pub requests_failed: u64,
    /// h2load's own figure (requests done ÷ its run time).
    pub requests_per_s: f64,
    /// h2load's mean time per request, ms.
    pub mean_request_ms: Option<f64>,
}

/// The h2load command line for `spec`.
pub fn command(spec: &LoadSpec<'_>) -> Command {
    let exe = std::env::var("HOOKLINE_BENCH_H2LOAD").unwrap_or_else(|_| "h2load".into());
    let mut cmd = Command::new(exe);
    cmd.arg("-c")
        .arg(spec.connections.to_string())
        .args(["-m", "1", "-t", "1"])
        .arg("-d")
        .arg(spec.body_file)
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .arg("-H")
        .arg(format!("authorization: Bearer {}", spec.token));
    match (spec.duration_s, spec.requests) {
        (Some(d), _) => {
            cmd.arg("-D").arg(format!("{d}"));
        }
        (None, Some(n)) => {
            cmd.arg("-n").arg(n.to_string());
        }
        (None, None) => {}
    }
    if let Some(r) = spec.rate {
        // h2load paces each connection (client) separately.
        cmd.arg("--rps")
            .arg(format!("{:.3}", r / spec.connections as f64));
    }
    cmd.arg(format!("{}{PUBLISH_PATH}", spec.url.trim_end_matches('/')))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Runs h2load to the end; its output parsed.
pub async fn run(spec: &LoadSpec<'_>) -> Result<LoadResult, BenchError> {
    let out = command(spec).output().await.map_err(|e| {
        BenchError::io(
            "running h2load (install Debian's nghttp2-client: apt-get install nghttp2-client)",
            e,
        )
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(BenchError::Server(format!(
            "h2load failed ({}): {} {}",
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    parse(&stdout).ok_or_else(|| {
        BenchError::Server(format!("cannot read h2load's report: {}", stdout.trim()))
    })
}

/// Reads `finished in …, N req/s, …`, `requests: N total, … N done, N succeeded, N
/// failed, …` and `time for request: min max mean …`.
pub fn parse(text: &str) -> Option<LoadResult> {
    let mut r = LoadResult::default();
    let mut seen = false;
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            r.requests_per_s = rest
                .split(", ")
                .find_map(|p| p.strip_suffix(" req/s"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0.0);
        } else if let Some(rest) = line.strip_prefix("requests: ") {
            seen = true;
            for part in rest.split(", ") {
                let mut w = part.split_whitespace();
                let (Some(n), Some(what)) = (w.next(), w.next()) else {
                    continue;
                };
                let n = n.parse().unwrap_or(0);
                match what {
                    "done" => r.requests_done = n,
                    "succeeded" => r.requests_succeeded = n,
                    "failed" => r.requests_failed = n,
                    _ => {}
                }
            }
        } else if let Some(rest) = line.strip_prefix("time for request:") {
            r.mean_request_ms = rest.split_whitespace().nth(2).and_then(ms);
        }
    }
    seen.then_some(r)
}

/// `12.34ms`, `1.2s` or `345us` in milliseconds.
fn ms(v: &str) -> Option<f64> {
    if let Some(x) = v.strip_suffix("ms") {
        x.parse().ok()
    } else if let Some(x) = v.strip_suffix("us") {
        x.parse::<f64>().ok().map(|x| x / 1000.0)
    } else {
        v.strip_suffix('s')?.parse::<f64>().ok().map(|x| x * 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_the_request_and_reads_the_report() {
        let body = publish_body("ten_1", "bench.g0", 200);
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        assert_eq!((body[0], body.len()), (0, 5 + len));
        let req = pb::PublishRequest::decode(&body[5..]).unwrap();
        assert_eq!((req.tenant_id.as_str(), req.payload.len()), ("ten_1", 200));

        let text = "finished in 10.00s, 2710.50 req/s, 1.2MB/s\n\
            requests: 27105 total, 27137 started, 27105 done, 27100 succeeded, 5 failed, 5 errored, 0 timeout\n\
            status codes: 27100 2xx, 0 3xx, 0 4xx, 0 5xx\n\
                         min         max         mean         sd        +/- sd\n\
            time for request:   812us     95.20ms     11.79ms      4.10ms    80.00%\n";
        let r = parse(text).unwrap();
        assert_eq!(
            (r.requests_done, r.requests_succeeded, r.requests_failed),
            (27105, 27100, 5)
        );
        assert!((r.requests_per_s - 2710.5).abs() < 1e-9);
        assert_eq!(r.mean_request_ms, Some(11.79));
        assert!(parse("nothing").is_none());
    }
}
