//! The client commands: `hookline publish`, `tenants`, `subscriptions`, `deliveries` (and
//! `tail`, in its own module) talk to a running server over the public gRPC API. Tables
//! for people, `--json` (one JSON document, or one per line for `tail`) for scripts.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use hookline_proto::v1 as pb;
use hookline_proto::v1::delivery_service_client::DeliveryServiceClient;
use hookline_proto::v1::ingest_service_client::IngestServiceClient;
use hookline_proto::v1::registry_service_client::RegistryServiceClient;
use serde_json::{Value, json};
use tonic::transport::Channel;

/// Where the server is and who we are.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// gRPC address of a Hookline server.
    #[arg(
        long,
        env = "HOOKLINE_SERVER",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub server: String,
    /// API key, sent as `authorization: Bearer <token>`.
    #[arg(long, env = "HOOKLINE_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Creates a tenant (admin key).
    Create {
        #[arg(long)]
        name: String,
    },
    /// Lists tenants.
    List,
}

#[derive(Debug, Subcommand)]
pub enum SubscriptionCommand {
    /// Creates a subscription and prints its signing secret once.
    Create {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        url: String,
        /// Event-type filter (`invoice.paid`, `invoice.*`); repeat for several; none = all.
        #[arg(long = "event-type")]
        event_types: Vec<String>,
        /// Channel; repeat for several.
        #[arg(long = "channel")]
        channels: Vec<String>,
        /// Retry delays in milliseconds, comma-separated (default: Hookline's schedule).
        #[arg(long, value_delimiter = ',')]
        retry_schedule_ms: Vec<u64>,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Lists a tenant's subscriptions.
    List {
        #[arg(long)]
        tenant: String,
    },
    /// Shows one subscription.
    Get { id: String },
}

#[derive(Debug, Subcommand)]
pub enum DeliveryCommand {
    /// Lists deliveries, newest first.
    List {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        subscription: Option<String>,
        #[arg(long)]
        event: Option<String>,
        /// pending, retrying, succeeded or failed.
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Shows one delivery with every attempt.
    Get { id: String },
    /// Makes a new attempt now.
    Retry { id: String },
    /// Retries every failed delivery of a subscription created in the last `--since` seconds.
    Replay {
        #[arg(long)]
        subscription: String,
        /// How far back, in seconds.
        #[arg(long, default_value_t = 86_400)]
        since_secs: i64,
    },
}

/// `hookline publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    #[arg(long)]
    pub tenant: String,
    #[arg(long = "type")]
    pub event_type: String,
    /// The JSON payload; `-` reads it from stdin.
    #[arg(long)]
    pub data: String,
    #[arg(long)]
    pub idempotency_key: Option<String>,
    #[arg(long = "channel")]
    pub channels: Vec<String>,
}

pub(crate) struct Client {
    args: ClientArgs,
    channel: Channel,
}

impl Client {
    pub(crate) async fn connect(args: &ClientArgs) -> anyhow::Result<Self> {
        let channel = Channel::from_shared(args.server.clone())
            .with_context(|| {
                format!(
                    "--server {:?} is not a URL like http://127.0.0.1:50051",
                    args.server
                )
            })?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .with_context(|| format!("cannot reach a Hookline server at {}", args.server))?;
        Ok(Self {
            args: args.clone(),
            channel,
        })
    }

    pub(crate) fn request<T>(&self, msg: T) -> anyhow::Result<tonic::Request<T>> {
        let mut req = tonic::Request::new(msg);
        let token = self
            .args
            .token
            .as_deref()
            .context("no API key: pass --token or set HOOKLINE_TOKEN (create one with `hookline admin create-key`)")?;
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}")
                .parse()
                .context("the API key has characters that cannot go in a header")?,
        );
        Ok(req)
    }

    fn registry(&self) -> RegistryServiceClient<Channel> {
        RegistryServiceClient::new(self.channel.clone())
    }
    fn ingest(&self) -> IngestServiceClient<Channel> {
        IngestServiceClient::new(self.channel.clone())
    }
    pub(crate) fn deliveries(&self) -> DeliveryServiceClient<Channel> {
        DeliveryServiceClient::new(self.channel.clone())
    }
}

/// A gRPC error as a one-line message.
pub(crate) fn rpc(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", e.code(), e.message())
}

pub async fn publish(args: &ClientArgs, p: PublishArgs) -> anyhow::Result<()> {
    let client = Client::connect(args).await?;
    let payload = if p.data == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf).context("reading stdin")?;
        buf
    } else {
        p.data.into_bytes()
    };
    let res = client
        .ingest()
        .publish(client.request(pb::PublishRequest {
            tenant_id: p.tenant,
            event_type: p.event_type,
            payload,
            idempotency_key: p.idempotency_key.unwrap_or_default(),
            channels: p.channels,
        })?)
        .await
        .map_err(rpc)?
        .into_inner();
    if args.json {
        print_json(&json!({
            "event_id": res.event_id,
            "deliveries_created": res.deliveries_created,
            "duplicate": res.duplicate,
        }));
    } else {
        let dup = if res.duplicate {
            " (duplicate: nothing new created)"
        } else {
            ""
        };
        println!(
            "{}  {} deliveries{dup}",
            res.event_id, res.deliveries_created
        );
    }
    Ok(())
}

pub async fn tenants(args: &ClientArgs, cmd: TenantCommand) -> anyhow::Result<()> {
    let client = Client::connect(args).await?;
    let tenants = match cmd {
        TenantCommand::Create { name } => vec![
            client
                .registry()
                .create_tenant(client.request(pb::CreateTenantRequest {
                    name,
                    metadata: BTreeMap::new(),
                    quotas: None,
                })?)
                .await
                .map_err(rpc)?
                .into_inner(),
        ],
        TenantCommand::List => {
            let mut all = Vec::new();
            let mut token = String::new();
            loop {
                let page = client
                    .registry()
                    .list_tenants(client.request(pb::ListTenantsRequest {
                        page_size: 1000,
                        page_token: token,
                    })?)
                    .await
                    .map_err(rpc)?
                    .into_inner();
                all.extend(page.tenants);
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            all
        }
    };
    if args.json {
        print_json(&Value::Array(
            tenants
                .iter()
                .map(|t| json!({"id": t.id, "name": t.name, "created_at": ts(t.created_at.as_ref())}))
                .collect(),
        ));
    } else {
        table(
            &["ID", "NAME", "CREATED"],
            tenants
                .iter()
                .map(|t| vec![t.id.clone(), t.name.clone(), ts(t.created_at.as_ref())])
                .collect(),
        );
    }
    Ok(())
}

fn subscription_json(s: &pb::Subscription) -> Value {
    json!({
        "id": s.id,
        "tenant_id": s.tenant_id,
        "url": s.url,
        "description": s.description,
        "event_types": s.event_types,
        "channels": s.channels,
        "state": state_name(s.state),
        "disabled_reason": s.disabled_reason,
        "retry_schedule_ms": s.retry_policy.as_ref().map(|p| p.schedule.iter().map(|d| d.seconds * 1000 + i64::from(d.nanos) / 1_000_000).collect::<Vec<_>>()),
        "created_at": ts(s.created_at.as_ref()),
    })
}

fn state_name(state: i32) -> &'static str {
    match pb::SubscriptionState::try_from(state) {
        Ok(pb::SubscriptionState::Enabled) => "enabled",
        Ok(pb::SubscriptionState::Disabled) => "disabled",
        _ => "unknown",
    }
}

fn subscription_rows(subs: &[pb::Subscription]) {
    table(
        &["ID", "STATE", "URL", "EVENT TYPES", "CREATED"],
        subs.iter()
            .map(|s| {
                let filters = if s.event_types.is_empty() {
                    "*".to_string()
                } else {
                    s.event_types.join(",")
                };
                vec![
                    s.id.clone(),
                    state_name(s.state).into(),
                    s.url.clone(),
                    filters,
                    ts(s.created_at.as_ref()),
                ]
            })
            .collect(),
    );
}

pub async fn subscriptions(args: &ClientArgs, cmd: SubscriptionCommand) -> anyhow::Result<()> {
    let client = Client::connect(args).await?;
    match cmd {
        SubscriptionCommand::Create {
            tenant,
            url,
            event_types,
            channels,
            retry_schedule_ms,
            description,
        } => {
            let retry_policy = (!retry_schedule_ms.is_empty()).then(|| pb::RetryPolicy {
                schedule: retry_schedule_ms
                    .iter()
                    .map(|ms| prost_types::Duration {
                        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
                        nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
                    })
                    .collect(),
            });
            let res = client
                .registry()
                .create_subscription(client.request(pb::CreateSubscriptionRequest {
                    subscription: Some(pb::Subscription {
                        tenant_id: tenant,
                        url,
                        description,
                        event_types,
                        channels,
                        retry_policy,
                        ..Default::default()
                    }),
                    start_disabled: false,
                    secret: String::new(),
                })?)
                .await
                .map_err(rpc)?
                .into_inner();
            let sub = res.subscription.unwrap_or_default();
            if args.json {
                let mut v = subscription_json(&sub);
                v["secret"] = Value::String(res.secret);
                print_json(&v);
            } else {
                subscription_rows(std::slice::from_ref(&sub));
                println!(
                    "\nsigning secret (shown once; `GetSecret` shows it again): {}",
                    res.secret
                );
            }
        }
        SubscriptionCommand::List { tenant } => {
            let mut all = Vec::new();
            let mut token = String::new();
            loop {
                let page = client
                    .registry()
                    .list_subscriptions(client.request(pb::ListSubscriptionsRequest {
                        tenant_id: tenant.clone(),
                        page_size: 1000,
                        page_token: token,
                    })?)
                    .await
                    .map_err(rpc)?
                    .into_inner();
                all.extend(page.subscriptions);
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            if args.json {
                print_json(&Value::Array(all.iter().map(subscription_json).collect()));
            } else {
                subscription_rows(&all);
            }
        }
        SubscriptionCommand::Get { id } => {
            let sub = client
                .registry()
                .get_subscription(client.request(pb::GetSubscriptionRequest {
                    subscription_id: id,
                })?)
                .await
                .map_err(rpc)?
                .into_inner();
            if args.json {
                print_json(&subscription_json(&sub));
            } else {
                subscription_rows(std::slice::from_ref(&sub));
            }
        }
    }
    Ok(())
}

fn status_name(status: i32) -> &'static str {
    match pb::DeliveryStatus::try_from(status) {
        Ok(pb::DeliveryStatus::Pending) => "pending",
        Ok(pb::DeliveryStatus::Retrying) => "retrying",
        Ok(pb::DeliveryStatus::Succeeded) => "succeeded",
        Ok(pb::DeliveryStatus::Failed) => "failed",
        _ => "unknown",
    }
}

fn parse_status(s: &str) -> anyhow::Result<pb::DeliveryStatus> {
    Ok(match s {
        "pending" => pb::DeliveryStatus::Pending,
        "retrying" => pb::DeliveryStatus::Retrying,
        "succeeded" => pb::DeliveryStatus::Succeeded,
        "failed" => pb::DeliveryStatus::Failed,
        other => bail!("--status {other:?}; allowed: pending, retrying, succeeded, failed"),
    })
}

pub(crate) fn delivery_json(d: &pb::Delivery) -> Value {
    json!({
        "id": d.id,
        "event_id": d.event_id,
        "tenant_id": d.tenant_id,
        "subscription_id": d.subscription_id,
        "event_type": d.event_type,
        "status": status_name(d.status),
        "attempt_count": d.attempt_count,
        "last_status_code": d.last_status_code,
        "last_error": d.last_error,
        "next_attempt_at": ts(d.next_attempt_at.as_ref()),
        "last_attempt_at": ts(d.last_attempt_at.as_ref()),
        "created_at": ts(d.created_at.as_ref()),
        "updated_at": ts(d.updated_at.as_ref()),
    })
}

pub(crate) fn delivery_row(d: &pb::Delivery) -> Vec<String> {
    let last = match (d.last_status_code, d.last_error.as_str()) {
        (0, "") => String::new(),
        (0, e) => e.to_string(),
        (code, _) => code.to_string(),
    };
    vec![
        d.id.clone(),
        status_name(d.status).into(),
        d.attempt_count.to_string(),
        last,
        d.event_type.clone(),
        d.subscription_id.clone(),
        ts(d.next_attempt_at.as_ref()),
    ]
}

const DELIVERY_HEADERS: [&str; 7] = [
    "ID",
    "STATUS",
    "ATTEMPTS",
    "LAST",
    "EVENT TYPE",
    "SUBSCRIPTION",
    "NEXT ATTEMPT",
];

fn attempt_json(a: &pb::Attempt) -> Value {
    json!({
        "attempt_number": a.attempt_number,
        "started_at": ts(a.started_at.as_ref()),
        "duration_ms": a.duration_ms,
        "status_code": a.status_code,
        "error_class": error_class_name(a.error_class),
        "error_message": a.error_message,
        "response_excerpt": String::from_utf8_lossy(&a.response_excerpt),
    })
}

fn error_class_name(c: i32) -> &'static str {
    match pb::ErrorClass::try_from(c) {
        Ok(pb::ErrorClass::Timeout) => "timeout",
        Ok(pb::ErrorClass::Connect) => "connect",
        Ok(pb::ErrorClass::Dns) => "dns",
        Ok(pb::ErrorClass::Tls) => "tls",
        Ok(pb::ErrorClass::Body) => "body",
        Ok(pb::ErrorClass::Status) => "status",
        Ok(pb::ErrorClass::Invalid) => "invalid",
        Ok(pb::ErrorClass::Egress) => "egress",
        _ => "",
    }
}

pub async fn deliveries(args: &ClientArgs, cmd: DeliveryCommand) -> anyhow::Result<()> {
    let client = Client::connect(args).await?;
    match cmd {
        DeliveryCommand::List {
            tenant,
            subscription,
            event,
            status,
            limit,
        } => {
            let status = status
                .as_deref()
                .map(parse_status)
                .transpose()?
                .unwrap_or(pb::DeliveryStatus::Unspecified);
            let res = client
                .deliveries()
                .list_deliveries(client.request(pb::ListDeliveriesRequest {
                    tenant_id: tenant.unwrap_or_default(),
                    subscription_id: subscription.unwrap_or_default(),
                    event_id: event.unwrap_or_default(),
                    status: status as i32,
                    since: None,
                    until: None,
                    page_size: limit,
                    page_token: String::new(),
                })?)
                .await
                .map_err(rpc)?
                .into_inner();
            if args.json {
                print_json(&Value::Array(
                    res.deliveries.iter().map(delivery_json).collect(),
                ));
            } else {
                table(
                    &DELIVERY_HEADERS,
                    res.deliveries.iter().map(delivery_row).collect(),
                );
            }
        }
        DeliveryCommand::Get { id } => {
            let res = client
                .deliveries()
                .get_delivery(client.request(pb::GetDeliveryRequest { delivery_id: id })?)
                .await
                .map_err(rpc)?
                .into_inner();
            let d = res.delivery.unwrap_or_default();
            if args.json {
                let mut v = delivery_json(&d);
                v["attempts"] = Value::Array(res.attempts.iter().map(attempt_json).collect());
                print_json(&v);
            } else {
                table(&DELIVERY_HEADERS, vec![delivery_row(&d)]);
                println!();
                table(
                    &["#", "STARTED", "MS", "STATUS", "ERROR", "RESPONSE"],
                    res.attempts
                        .iter()
                        .map(|a| {
                            let status = if a.status_code == 0 {
                                String::new()
                            } else {
                                a.status_code.to_string()
                            };
                            let error =
                                match (error_class_name(a.error_class), a.error_message.as_str()) {
                                    ("", _) => String::new(),
                                    (c, "") => c.to_string(),
                                    (c, m) => format!("{c}: {m}"),
                                };
                            let excerpt: String = String::from_utf8_lossy(&a.response_excerpt)
                                .chars()
                                .take(60)
                                .map(|c| if c.is_control() { ' ' } else { c })
                                .collect();
                            vec![
                                a.attempt_number.to_string(),
                                ts(a.started_at.as_ref()),
                                a.duration_ms.to_string(),
                                status,
                                error,
                                excerpt,
                            ]
                        })
                        .collect(),
                );
            }
        }
        DeliveryCommand::Retry { id } => {
            let d = client
                .deliveries()
                .retry_delivery(client.request(pb::RetryDeliveryRequest { delivery_id: id })?)
                .await
                .map_err(rpc)?
                .into_inner();
            if args.json {
                print_json(&delivery_json(&d));
            } else {
                table(&DELIVERY_HEADERS, vec![delivery_row(&d)]);
            }
        }
        DeliveryCommand::Replay {
            subscription,
            since_secs,
        } => {
            let since = chrono::Utc::now() - chrono::Duration::seconds(since_secs.max(0));
            let res = client
                .deliveries()
                .replay_failed(client.request(pb::ReplayFailedRequest {
                    subscription_id: subscription,
                    since: Some(prost_types::Timestamp {
                        seconds: since.timestamp(),
                        nanos: 0,
                    }),
                    until: None,
                })?)
                .await
                .map_err(rpc)?
                .into_inner();
            if args.json {
                print_json(&json!({"replayed": res.replayed}));
            } else {
                println!("{} failed deliveries queued again", res.replayed);
            }
        }
    }
    Ok(())
}

pub(crate) fn ts(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}

fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

/// Prints rows under headers, each column as wide as its widest cell.
fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
}
