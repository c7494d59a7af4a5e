//! `/metrics` after known traffic: the page parses as Prometheus text, and the counters
//! equal what was sent.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use hookline_proto::v1 as pb;
use hookline_proto::v1::ingest_service_client::IngestServiceClient;
use hookline_proto::v1::registry_service_client::RegistryServiceClient;
use support::receiver::{Behavior, Receiver};
use support::{Env, authed, http_get};

/// Parses Prometheus text exposition strictly enough to catch a malformed page:
/// every sample line is `name{labels} value`, every `# TYPE` names a known type.
/// Returns samples keyed by `name{labels}` exactly as written.
fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let kind = rest.split_whitespace().nth(1).expect("TYPE has a kind");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "bad TYPE line {line:?}"
            );
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample has a value");
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "unclosed labels in {line:?}");
        }
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        samples.insert(series.to_string(), value);
    }
    samples
}

/// Every metric family on the page has a `# HELP` and a `# TYPE` line (the binary's
/// metrics_catalog describes each one).
fn assert_every_metric_described(page: &str) {
    let declared = |kind: &str| -> std::collections::HashSet<String> {
        page.lines()
            .filter_map(|l| l.strip_prefix(kind))
            .filter_map(|rest| rest.split_whitespace().next())
            .map(str::to_string)
            .collect()
    };
    let (help, types) = (declared("# HELP "), declared("# TYPE "));
    for line in page
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let name = &line[..line.find(['{', ' ']).unwrap_or(line.len())];
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| types.contains(*f)))
            .unwrap_or(name);
        assert!(help.contains(family), "no # HELP for {family}:\n{page}");
        assert!(types.contains(family), "no # TYPE for {family}:\n{page}");
    }
}

/// The sum of every series of `name` whose labels contain `label` (if given).
fn total(samples: &HashMap<String, f64>, name: &str, label: Option<&str>) -> f64 {
    samples
        .iter()
        .filter(|(k, _)| {
            let n = &k[..k.find('{').unwrap_or(k.len())];
            n == name && label.is_none_or(|l| k.contains(l))
        })
        .map(|(_, v)| v)
        .sum()
}

#[tokio::test]
async fn counters_equal_the_traffic_sent() {
    const OK_EVENTS: usize = 20;
    const FAILING_EVENTS: usize = 5;
    let env = Env::new().await;
    let admin = env.admin_key().await;
    let server = env
        .serve_with("all", &[("HOOKLINE_RETRY_POLL_INTERVAL_MS", "50")])
        .await;
    let receiver = Receiver::start().await;
    let channel = tonic::transport::Channel::from_shared(server.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut registry = RegistryServiceClient::new(channel.clone());
    let tenant = registry
        .create_tenant(authed(
            pb::CreateTenantRequest {
                name: "acme".into(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .id;
    for (name, behavior, filter) in [
        ("ok", Behavior::Ok, "ok.*"),
        ("down", Behavior::Always(500), "down.*"),
    ] {
        let url = receiver.endpoint(name, behavior);
        registry
            .create_subscription(authed(
                pb::CreateSubscriptionRequest {
                    subscription: Some(pb::Subscription {
                        tenant_id: tenant.clone(),
                        url,
                        event_types: vec![filter.into()],
                        retry_policy: Some(pb::RetryPolicy {
                            schedule: vec![prost_types::Duration {
                                seconds: 0,
                                nanos: 50_000_000,
                            }],
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                &admin,
            ))
            .await
            .unwrap();
    }
    let mut ingest = IngestServiceClient::new(channel);
    for (event_type, n) in [("ok.sent", OK_EVENTS), ("down.sent", FAILING_EVENTS)] {
        for _ in 0..n {
            ingest
                .publish(authed(
                    pb::PublishRequest {
                        tenant_id: tenant.clone(),
                        event_type: event_type.into(),
                        payload: b"{}".to_vec(),
                        ..Default::default()
                    },
                    &admin,
                ))
                .await
                .unwrap();
        }
    }
    // A refused publish counts nothing.
    let refused = ingest
        .publish(authed(
            pb::PublishRequest {
                tenant_id: tenant.clone(),
                event_type: "ok.sent".into(),
                payload: b"not json".to_vec(),
                ..Default::default()
            },
            &admin,
        ))
        .await;
    assert!(refused.is_err());

    // Wait until every outcome is counted: 20 successes, 5 first failures, 5 final.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let (samples, page) = loop {
        let (code, body) = http_get(&server.admin, "/metrics").await;
        assert_eq!(code, 200);
        let samples = parse_prometheus(&body);
        let done = total(
            &samples,
            "hookline_deliveries_total",
            Some(r#"outcome="failed""#),
        ) >= FAILING_EVENTS as f64
            && total(
                &samples,
                "hookline_deliveries_total",
                Some(r#"outcome="succeeded""#),
            ) >= OK_EVENTS as f64;
        if done {
            break (samples, body);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "outcomes not all counted within 60 s:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let all = (OK_EVENTS + FAILING_EVENTS) as f64;
    assert_eq!(
        total(&samples, "hookline_events_published_total", None),
        all
    );
    assert_eq!(
        total(&samples, "hookline_deliveries_created_total", None),
        all
    );
    assert_eq!(
        total(
            &samples,
            "hookline_deliveries_total",
            Some(r#"outcome="succeeded""#)
        ),
        OK_EVENTS as f64
    );
    assert_eq!(
        total(
            &samples,
            "hookline_deliveries_total",
            Some(r#"outcome="retrying""#)
        ),
        FAILING_EVENTS as f64
    );
    assert_eq!(
        total(
            &samples,
            "hookline_deliveries_total",
            Some(r#"outcome="failed""#)
        ),
        FAILING_EVENTS as f64
    );
    // One attempt per success, two per failing event.
    assert_eq!(
        total(&samples, "hookline_attempt_duration_seconds_count", None),
        (OK_EVENTS + 2 * FAILING_EVENTS) as f64
    );
    assert_eq!(
        total(&samples, "hookline_retries_enqueued_total", None),
        FAILING_EVENTS as f64
    );
    assert_eq!(total(&samples, "hookline_build_info", None), 1.0);
    assert_every_metric_described(&page);
    assert_eq!(receiver.received("ok").len(), OK_EVENTS);
    assert_eq!(receiver.received("down").len(), 2 * FAILING_EVENTS);
    assert!(server.terminate().await.success());
    env.finish().await;
}
