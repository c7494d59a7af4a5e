//! `hookline subscriptions`: a tenant's endpoints — create, list, show, change, enable
//! (also after a `410 Gone` disabled one), disable, delete, and their signing secrets.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use hookline_proto::v1 as pb;
use serde_json::{Value, json};

use super::output::{Format, duration_from_ms, duration_ms, enum_name, print_table, ts};
use super::{Client, ClientArgs, all_pages, print_deleted, request, rpc};

#[derive(Debug, Subcommand)]
pub enum SubscriptionCommand {
    /// Creates a subscription and prints its signing secret once.
    Create {
        /// The tenant the subscription belongs to (`ten_…`).
        #[arg(long)]
        tenant: String,
        /// Where deliveries are POSTed: http or https, at most 2,048 characters.
        #[arg(long)]
        url: String,
        #[command(flatten)]
        fields: Fields,
        /// Create it disabled: it receives nothing until `subscriptions enable`.
        #[arg(long)]
        disabled: bool,
        /// How requests are signed, fixed for the subscription's life: `hmac` (`v1`, a
        /// shared `whsec_` secret; the default) or `ed25519` (`v1a`; receivers verify with
        /// the `whpk_` public key printed instead of a secret).
        #[arg(long, value_parser = ["hmac", "ed25519"])]
        signature_scheme: Option<String>,
    },
    /// Lists a tenant's subscriptions in creation order.
    List {
        /// The tenant (`ten_…`).
        #[arg(long)]
        tenant: String,
    },
    /// Shows one subscription.
    Get {
        /// The subscription's id (`sub_…`).
        id: String,
    },
    /// Changes the given fields of a subscription; the others stay as they are.
    Update {
        /// The subscription's id (`sub_…`).
        id: String,
        /// A new endpoint URL.
        #[arg(long)]
        url: Option<String>,
        #[command(flatten)]
        fields: Fields,
        /// Deliver every event type again (clears the event-type filters).
        #[arg(long, conflicts_with = "event_types")]
        all_event_types: bool,
        /// Listen on every channel again (clears the channels).
        #[arg(long, conflicts_with = "channels")]
        all_channels: bool,
        /// Use Hookline's default retry schedule again.
        #[arg(long, conflicts_with = "retry_schedule_ms")]
        default_retry_schedule: bool,
        /// Send no extra headers any more.
        #[arg(long, conflicts_with = "headers")]
        no_headers: bool,
        /// Present no client certificate of its own any more (the server's default, if any).
        #[arg(long, conflicts_with_all = ["client_cert", "client_key"])]
        no_client_cert: bool,
    },
    /// Enables a subscription, also one disabled by a `410 Gone` or by failures.
    Enable {
        /// The subscription's id (`sub_…`).
        id: String,
    },
    /// Disables a subscription: it receives nothing until enabled again.
    Disable {
        /// The subscription's id (`sub_…`).
        id: String,
    },
    /// Deletes a subscription.
    Delete {
        /// The subscription's id (`sub_…`).
        id: String,
    },
    /// Shows the signing secrets that currently sign, newest (current) first.
    Secret {
        /// The subscription's id (`sub_…`).
        id: String,
    },
    /// Makes a new signing secret current; the previous one keeps signing for the grace period.
    RotateSecret {
        /// The subscription's id (`sub_…`).
        id: String,
        /// How long the previous secret keeps signing, in seconds (default 24 h, at most 7 days).
        #[arg(long)]
        grace_secs: Option<u64>,
    },
}

/// The fields `create` and `update` share.
#[derive(Debug, Args)]
pub struct Fields {
    /// Event-type filter (`invoice.paid`, `invoice.*`); repeat for several (on create, none = every type).
    #[arg(long = "event-type")]
    event_types: Vec<String>,
    /// A channel to listen on; repeat for several (on create, none = every channel).
    #[arg(long = "channel")]
    channels: Vec<String>,
    /// Retry delays in milliseconds, comma-separated (default: Hookline's schedule).
    #[arg(long, value_delimiter = ',')]
    retry_schedule_ms: Vec<u64>,
    /// A description for people.
    #[arg(long)]
    description: Option<String>,
    /// At most this many requests per second to the endpoint; 0 = no limit.
    #[arg(long)]
    rate_limit: Option<u32>,
    /// At most this many requests in flight to the endpoint; 0 = no limit.
    #[arg(long)]
    max_in_flight: Option<u32>,
    /// An extra HTTP header sent with every request, `NAME=VALUE` (not `webhook-*`);
    /// repeat for several (on update, they replace all the headers).
    #[arg(long = "header", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// The request body: `raw` (the payload as published; the default) or `envelope`
    /// (Standard Webhooks `{"type", "timestamp", "data"}`); see docs/RECEIVING.md.
    #[arg(long, value_parser = ["raw", "envelope"])]
    payload_format: Option<String>,
    /// `ordered`: deliveries one at a time, in publish order (a retried one holds the rest);
    /// `unordered` (the default): in parallel. See docs/ARCHITECTURE.md "Ordered delivery".
    #[arg(long, value_parser = ["ordered", "unordered"])]
    ordering: Option<String>,
    /// A PEM client certificate (chain, leaf first) presented to the endpoint when it asks
    /// for one (mutual TLS); needs `--client-key`. The key is never shown again.
    #[arg(long, requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// The PEM private key of `--client-cert`.
    #[arg(long, requires = "client_cert")]
    client_key: Option<PathBuf>,
}

/// Most bytes read from a `--client-cert`/`--client-key` file (the server allows 64 KiB).
const MAX_PEM_FILE_BYTES: u64 = 1024 * 1024;

/// The client certificate of `--client-cert`/`--client-key`, read; `None` when not given.
fn client_certificate(fields: &Fields) -> anyhow::Result<Option<pb::ClientCertificate>> {
    let (Some(cert), Some(key)) = (&fields.client_cert, &fields.client_key) else {
        return Ok(None);
    };
    let read = |flag: &str, path: &PathBuf| -> anyhow::Result<String> {
        let len = std::fs::metadata(path)
            .with_context(|| format!("{flag} {}", path.display()))?
            .len();
        anyhow::ensure!(
            len <= MAX_PEM_FILE_BYTES,
            "{flag} {}: {len} bytes is too large for a PEM file",
            path.display()
        );
        std::fs::read_to_string(path).with_context(|| format!("{flag} {}", path.display()))
    };
    Ok(Some(pb::ClientCertificate {
        certificate_pem: read("--client-cert", cert)?,
        private_key_pem: read("--client-key", key)?,
        ..Default::default()
    }))
}

fn signature_scheme(name: &str) -> i32 {
    match name {
        "ed25519" => pb::SignatureScheme::Ed25519 as i32,
        _ => pb::SignatureScheme::HmacSha256 as i32,
    }
}

fn signature_scheme_name(value: i32) -> &'static str {
    match pb::SignatureScheme::try_from(value) {
        Ok(pb::SignatureScheme::Ed25519) => "ed25519",
        _ => "hmac",
    }
}

fn client_certificate_json(c: Option<&pb::ClientCertificate>) -> Value {
    c.map_or(Value::Null, |c| {
        json!({
            "subject": c.subject,
            "sha256_fingerprint": c.sha256_fingerprint,
            "not_after": ts(c.not_after.as_ref()),
        })
    })
}

fn payload_format(name: &str) -> i32 {
    match name {
        "envelope" => pb::PayloadFormat::Envelope as i32,
        _ => pb::PayloadFormat::Raw as i32,
    }
}

fn payload_format_name(value: i32) -> String {
    let format = pb::PayloadFormat::try_from(value).ok();
    match format {
        Some(pb::PayloadFormat::Unspecified) => "raw".to_string(),
        other => enum_name(other.map(|f| f.as_str_name()), "PAYLOAD_FORMAT_"),
    }
}

fn ordering(name: &str) -> i32 {
    match name {
        "ordered" => pb::Ordering::Ordered as i32,
        _ => pb::Ordering::Unordered as i32,
    }
}

fn ordering_name(value: i32) -> String {
    match pb::Ordering::try_from(value).ok() {
        Some(pb::Ordering::Unspecified) => "unordered".to_string(),
        other => enum_name(other.map(|o| o.as_str_name()), "ORDERING_"),
    }
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, value)) if !name.trim().is_empty() => {
            Ok((name.trim().to_string(), value.to_string()))
        }
        _ => Err(format!("{s:?} is not NAME=VALUE")),
    }
}

fn retry_policy(ms: &[u64]) -> Option<pb::RetryPolicy> {
    (!ms.is_empty()).then(|| pb::RetryPolicy {
        schedule: ms.iter().map(|&ms| duration_from_ms(ms)).collect(),
    })
}

fn state_name(state: i32) -> String {
    let state = pb::SubscriptionState::try_from(state).ok();
    enum_name(state.map(|s| s.as_str_name()), "SUBSCRIPTION_STATE_")
}

fn subscription_json(s: &pb::Subscription) -> Value {
    let schedule = s
        .retry_policy
        .as_ref()
        .map(|p| p.schedule.iter().map(duration_ms).collect::<Vec<_>>());
    json!({
        "id": s.id,
        "tenant_id": s.tenant_id,
        "url": s.url,
        "description": s.description,
        "event_types": s.event_types,
        "channels": s.channels,
        "headers": s.headers,
        "metadata": s.metadata,
        "rate_limit_per_second": s.rate_limit_per_second,
        "max_in_flight": s.max_in_flight,
        "state": state_name(s.state),
        "disabled_reason": s.disabled_reason,
        "retry_schedule_ms": schedule,
        "created_at": ts(s.created_at.as_ref()),
        "updated_at": ts(s.updated_at.as_ref()),
        "payload_format": payload_format_name(s.payload_format),
        "ordering": ordering_name(s.ordering),
        "circuit_open_until": ts(s.circuit_open_until.as_ref()),
        "signature_scheme": signature_scheme_name(s.signature_scheme),
        "client_certificate": client_certificate_json(s.client_certificate.as_ref()),
    })
}

const HEADERS: [&str; 7] = [
    "ID",
    "STATE",
    "URL",
    "EVENT TYPES",
    "CREATED",
    "DISABLED BECAUSE",
    "CIRCUIT OPEN UNTIL",
];

fn subscription_row(s: &pb::Subscription) -> Vec<String> {
    let filters = if s.event_types.is_empty() {
        "*".to_string()
    } else {
        s.event_types.join(",")
    };
    vec![
        s.id.clone(),
        state_name(s.state),
        s.url.clone(),
        filters,
        ts(s.created_at.as_ref()),
        s.disabled_reason.clone(),
        ts(s.circuit_open_until.as_ref()),
    ]
}

fn print_one(format: Format, s: &pb::Subscription) {
    format.one(&subscription_json(s), || {
        print_table(&HEADERS, vec![subscription_row(s)]);
    });
}

pub async fn subscriptions(args: &ClientArgs, cmd: SubscriptionCommand) -> anyhow::Result<()> {
    let client = args.connect().await?;
    let format = args.format();
    match cmd {
        SubscriptionCommand::Create {
            tenant,
            url,
            fields,
            disabled,
            signature_scheme,
        } => {
            let scheme = signature_scheme
                .as_deref()
                .map_or(0, self::signature_scheme);
            create(&client, format, (tenant, url, scheme), fields, disabled).await?
        }
        SubscriptionCommand::List { tenant } => list(&client, format, tenant).await?,
        SubscriptionCommand::Get { id } => get(&client, format, id).await?,
        SubscriptionCommand::Update {
            id,
            url,
            fields,
            all_event_types,
            all_channels,
            default_retry_schedule,
            no_headers,
            no_client_cert,
        } => {
            let clear = Clear {
                event_types: all_event_types,
                channels: all_channels,
                retry_schedule: default_retry_schedule,
                headers: no_headers,
                client_certificate: no_client_cert,
            };
            let (sub, paths) = changes(id, url, fields, clear)?;
            print_one(format, &update(&client, sub, &paths).await?);
        }
        SubscriptionCommand::Enable { id } => {
            print_one(
                format,
                &set_state(&client, id, pb::SubscriptionState::Enabled).await?,
            );
        }
        SubscriptionCommand::Disable { id } => {
            print_one(
                format,
                &set_state(&client, id, pb::SubscriptionState::Disabled).await?,
            );
        }
        SubscriptionCommand::Delete { id } => delete(&client, format, id).await?,
        SubscriptionCommand::Secret { id } => secret(&client, format, id).await?,
        SubscriptionCommand::RotateSecret { id, grace_secs } => {
            rotate_secret(&client, format, id, grace_secs).await?
        }
    }
    Ok(())
}

/// `subscription list`: every page of the tenant's subscriptions.
async fn list(client: &Client, format: Format, tenant: String) -> anyhow::Result<()> {
    let mut registry = client.registry();
    let all = all_pages(async |page_token| {
        let msg = pb::ListSubscriptionsRequest {
            tenant_id: tenant.clone(),
            page_size: hookline_store::MAX_PAGE_LIMIT,
            page_token,
        };
        let page = registry.list_subscriptions(request(client, msg)?).await;
        let page = page.map_err(rpc)?.into_inner();
        Ok((page.subscriptions, page.next_page_token))
    })
    .await?;
    format.items(&all, subscription_json, &HEADERS, subscription_row);
    Ok(())
}

/// `subscription get`.
async fn get(client: &Client, format: Format, id: String) -> anyhow::Result<()> {
    let msg = pb::GetSubscriptionRequest {
        subscription_id: id,
    };
    let s = client
        .registry()
        .get_subscription(request(client, msg)?)
        .await;
    print_one(format, &s.map_err(rpc)?.into_inner());
    Ok(())
}

/// `subscription delete`.
async fn delete(client: &Client, format: Format, id: String) -> anyhow::Result<()> {
    let msg = pb::DeleteSubscriptionRequest {
        subscription_id: id.clone(),
    };
    let res = client
        .registry()
        .delete_subscription(request(client, msg)?)
        .await;
    res.map_err(rpc)?;
    print_deleted(format, "subscription", &id);
    Ok(())
}

/// `subscription rotate-secret`: a new signing secret; the previous one keeps signing for the grace period.
async fn rotate_secret(
    client: &Client,
    format: Format,
    id: String,
    grace_secs: Option<u64>,
) -> anyhow::Result<()> {
    let msg = pb::RotateSecretRequest {
        subscription_id: id,
        grace_period: grace_secs.map(|s| duration_from_ms(s.saturating_mul(1000))),
        secret: String::new(),
    };
    let res = client.registry().rotate_secret(request(client, msg)?).await;
    let res = res.map_err(rpc)?.into_inner();
    let expires = ts(res.previous_expires_at.as_ref());
    let v = json!({"secret": res.secret, "previous_expires_at": expires});
    format.one(&v, || {
        println!("new signing secret: {}", res.secret);
        println!("the previous secret keeps signing until {expires}");
    });
    Ok(())
}

/// `what` is the tenant, the URL and the signature scheme.
async fn create(
    client: &Client,
    format: Format,
    (tenant, url, signature_scheme): (String, String, i32),
    fields: Fields,
    disabled: bool,
) -> anyhow::Result<()> {
    let client_certificate = client_certificate(&fields)?;
    let msg = pb::CreateSubscriptionRequest {
        subscription: Some(pb::Subscription {
            signature_scheme,
            client_certificate,
            tenant_id: tenant,
            url,
            description: fields.description.unwrap_or_default(),
            event_types: fields.event_types,
            channels: fields.channels,
            rate_limit_per_second: fields.rate_limit.unwrap_or(0),
            max_in_flight: fields.max_in_flight.unwrap_or(0),
            headers: fields.headers.into_iter().collect(),
            retry_policy: retry_policy(&fields.retry_schedule_ms),
            payload_format: fields.payload_format.as_deref().map_or(0, payload_format),
            ordering: fields.ordering.as_deref().map_or(0, ordering),
            ..Default::default()
        }),
        start_disabled: disabled,
        secret: String::new(),
    };
    let res = client
        .registry()
        .create_subscription(request(client, msg)?)
        .await;
    let res = res.map_err(rpc)?.into_inner();
    let sub = res.subscription.unwrap_or_default();
    let mut v = subscription_json(&sub);
    v["secret"] = Value::String(res.secret.clone());
    format.one(&v, || {
        print_table(&HEADERS, vec![subscription_row(&sub)]);
        let what = match pb::SignatureScheme::try_from(sub.signature_scheme) {
            Ok(pb::SignatureScheme::Ed25519) => "public key to verify `v1a` signatures with",
            _ => "signing secret",
        };
        println!(
            "\n{what} (shown once; `hookline subscriptions secret {}` shows it again): {}",
            sub.id, res.secret
        );
    });
    Ok(())
}

/// Which `update` flags reset a field to its default.
struct Clear {
    event_types: bool,
    channels: bool,
    retry_schedule: bool,
    headers: bool,
    client_certificate: bool,
}

/// The subscription carrying the changes, and the field-mask paths naming them.
fn changes(
    id: String,
    url: Option<String>,
    fields: Fields,
    clear: Clear,
) -> anyhow::Result<(pb::Subscription, Vec<&'static str>)> {
    let mut sub = pb::Subscription {
        id,
        ..Default::default()
    };
    let mut paths = Vec::new();
    sub.client_certificate = client_certificate(&fields)?;
    if let Some(url) = url {
        sub.url = url;
        paths.push("url");
    }
    if !fields.event_types.is_empty() || clear.event_types {
        sub.event_types = fields.event_types;
        paths.push("event_types");
    }
    if !fields.channels.is_empty() || clear.channels {
        sub.channels = fields.channels;
        paths.push("channels");
    }
    if !fields.retry_schedule_ms.is_empty() || clear.retry_schedule {
        sub.retry_policy = retry_policy(&fields.retry_schedule_ms);
        paths.push("retry_policy");
    }
    if let Some(d) = fields.description {
        sub.description = d;
        paths.push("description");
    }
    if let Some(n) = fields.rate_limit {
        sub.rate_limit_per_second = n;
        paths.push("rate_limit_per_second");
    }
    if let Some(n) = fields.max_in_flight {
        sub.max_in_flight = n;
        paths.push("max_in_flight");
    }
    if !fields.headers.is_empty() || clear.headers {
        sub.headers = fields.headers.into_iter().collect();
        paths.push("headers");
    }
    if let Some(f) = fields.payload_format.as_deref() {
        sub.payload_format = payload_format(f);
        paths.push("payload_format");
    }
    if let Some(o) = fields.ordering.as_deref() {
        sub.ordering = ordering(o);
        paths.push("ordering");
    }
    if sub.client_certificate.is_some() || clear.client_certificate {
        paths.push("client_certificate");
    }
    anyhow::ensure!(
        !paths.is_empty(),
        "nothing to change: give at least one of --url, --event-type, --channel, \
         --retry-schedule-ms, --description, --rate-limit, --max-in-flight, \
         --header, --payload-format, --ordering, --client-cert, --all-event-types, \
         --all-channels, --default-retry-schedule, --no-headers, --no-client-cert"
    );
    Ok((sub, paths))
}

async fn update(
    client: &Client,
    subscription: pb::Subscription,
    paths: &[&str],
) -> anyhow::Result<pb::Subscription> {
    let msg = pb::UpdateSubscriptionRequest {
        subscription: Some(subscription),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        }),
    };
    let res = client
        .registry()
        .update_subscription(request(client, msg)?)
        .await;
    Ok(res.map_err(rpc)?.into_inner())
}

async fn set_state(
    client: &Client,
    id: String,
    state: pb::SubscriptionState,
) -> anyhow::Result<pb::Subscription> {
    let sub = pb::Subscription {
        id,
        state: state as i32,
        ..Default::default()
    };
    update(client, sub, &["state"]).await
}

async fn secret(client: &Client, format: Format, id: String) -> anyhow::Result<()> {
    let msg = pb::GetSecretRequest {
        subscription_id: id,
    };
    let res = client.registry().get_secret(request(client, msg)?).await;
    let res = res.map_err(rpc)?.into_inner();
    let live: Vec<Value> = res
        .live_secrets
        .iter()
        .map(|s| {
            json!({
                "secret": s.secret,
                "created_at": ts(s.created_at.as_ref()),
                "expires_at": ts(s.expires_at.as_ref()),
            })
        })
        .collect();
    let v = json!({"secret": res.secret, "live_secrets": live});
    format.one(&v, || {
        print_table(
            &["SECRET", "CREATED", "EXPIRES"],
            res.live_secrets
                .iter()
                .map(|s| {
                    vec![
                        s.secret.clone(),
                        ts(s.created_at.as_ref()),
                        ts(s.expires_at.as_ref()),
                    ]
                })
                .collect(),
        );
    });
    Ok(())
}
