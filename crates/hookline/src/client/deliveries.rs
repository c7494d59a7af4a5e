//! `hookline deliveries`: list, inspect (every attempt), retry now, replay failed.

use clap::Subcommand;
use hookline_proto::v1 as pb;
use serde_json::{Value, json};

use super::output::{enum_name, nonzero, print_table, seconds_ago, ts};
use super::{ClientArgs, request, rpc};

#[derive(Debug, Subcommand)]
pub enum DeliveryCommand {
    /// Lists deliveries, newest first.
    List {
        /// Only deliveries of this tenant (`ten_…`).
        #[arg(long)]
        tenant: Option<String>,
        /// Only deliveries to this subscription (`sub_…`).
        #[arg(long)]
        subscription: Option<String>,
        /// Only deliveries of this event (`evt_…`).
        #[arg(long)]
        event: Option<String>,
        /// Only deliveries in this state.
        #[arg(long, value_parser = ["pending", "retrying", "succeeded", "failed"])]
        status: Option<String>,
        /// At most this many deliveries (1 to 1000).
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Shows one delivery with every attempt.
    Get {
        /// The delivery's id (`dlv_…`).
        id: String,
    },
    /// Makes a new attempt now.
    Retry {
        /// The delivery's id (`dlv_…`).
        id: String,
    },
    /// Retries every failed delivery of a subscription created in the last `--since-secs` seconds.
    Replay {
        /// The subscription (`sub_…`).
        #[arg(long)]
        subscription: String,
        /// How far back, in seconds (default: one day).
        #[arg(long, default_value_t = 86_400)]
        since_secs: u64,
    },
}

fn status_name(status: i32) -> String {
    let s = pb::DeliveryStatus::try_from(status).ok();
    enum_name(s.map(|s| s.as_str_name()), "DELIVERY_STATUS_")
}

fn error_class_name(class: i32) -> String {
    match pb::ErrorClass::try_from(class) {
        Ok(pb::ErrorClass::Unspecified) => String::new(),
        c => enum_name(c.ok().map(|c| c.as_str_name()), "ERROR_CLASS_"),
    }
}

pub fn delivery_json(d: &pb::Delivery) -> Value {
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
        "deferred_reason": d.deferred_reason,
        "deferred_until": ts(d.deferred_until.as_ref()),
    })
}

/// `circuit_open until <time>`, or empty when the delivery is not deferred.
fn deferral(d: &pb::Delivery) -> String {
    match (d.deferred_reason.as_str(), d.deferred_until.as_ref()) {
        ("", _) => String::new(),
        (reason, None) => reason.to_owned(),
        (reason, until) => format!("{reason} until {}", ts(until)),
    }
}

pub fn delivery_row(d: &pb::Delivery) -> Vec<String> {
    let last = match (d.last_status_code, d.last_error.as_str()) {
        (0, e) => e.to_string(),
        (code, _) => code.to_string(),
    };
    vec![
        d.id.clone(),
        status_name(d.status),
        d.attempt_count.to_string(),
        last,
        d.event_type.clone(),
        d.subscription_id.clone(),
        ts(d.next_attempt_at.as_ref()),
        deferral(d),
    ]
}

const HEADERS: [&str; 8] = [
    "ID",
    "STATUS",
    "ATTEMPTS",
    "LAST",
    "EVENT TYPE",
    "SUBSCRIPTION",
    "NEXT ATTEMPT",
    "DEFERRED",
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

fn attempt_row(a: &pb::Attempt) -> Vec<String> {
    let error = match (error_class_name(a.error_class), a.error_message.as_str()) {
        (c, "") => c,
        (c, m) => format!("{c}: {m}"),
    };
    vec![
        a.attempt_number.to_string(),
        ts(a.started_at.as_ref()),
        a.duration_ms.to_string(),
        nonzero(a.status_code),
        error,
        String::from_utf8_lossy(&a.response_excerpt).into_owned(),
    ]
}

pub async fn deliveries(args: &ClientArgs, cmd: DeliveryCommand) -> anyhow::Result<()> {
    let client = args.connect().await?;
    let mut api = client.deliveries();
    let format = args.format();
    match cmd {
        DeliveryCommand::List {
            tenant,
            subscription,
            event,
            status,
            limit,
        } => {
            let status = status
                .map(|s| format!("DELIVERY_STATUS_{}", s.to_ascii_uppercase()))
                .and_then(|s| pb::DeliveryStatus::from_str_name(&s))
                .unwrap_or(pb::DeliveryStatus::Unspecified);
            let msg = pb::ListDeliveriesRequest {
                tenant_id: tenant.unwrap_or_default(),
                subscription_id: subscription.unwrap_or_default(),
                event_id: event.unwrap_or_default(),
                status: status as i32,
                since: None,
                until: None,
                page_size: limit,
                page_token: String::new(),
            };
            let res = api.list_deliveries(request(&client, msg)?).await;
            let list = res.map_err(rpc)?.into_inner().deliveries;
            format.items(&list, delivery_json, &HEADERS, delivery_row);
        }
        DeliveryCommand::Get { id } => {
            let msg = pb::GetDeliveryRequest { delivery_id: id };
            let res = api.get_delivery(request(&client, msg)?).await;
            let res = res.map_err(rpc)?.into_inner();
            let d = res.delivery.unwrap_or_default();
            let mut v = delivery_json(&d);
            v["attempts"] = res.attempts.iter().map(attempt_json).collect();
            format.one(&v, || {
                print_table(&HEADERS, vec![delivery_row(&d)]);
                println!();
                print_table(
                    &["#", "STARTED", "MS", "STATUS", "ERROR", "RESPONSE"],
                    res.attempts.iter().map(attempt_row).collect(),
                );
            });
        }
        DeliveryCommand::Retry { id } => {
            let msg = pb::RetryDeliveryRequest { delivery_id: id };
            let d = api.retry_delivery(request(&client, msg)?).await;
            let d = d.map_err(rpc)?.into_inner();
            format.one(&delivery_json(&d), || {
                print_table(&HEADERS, vec![delivery_row(&d)]);
                if !d.deferred_reason.is_empty() {
                    println!(
                        "\nQueued again, but the subscription's circuit breaker is open: \
                         it goes at {} at the earliest.",
                        ts(d.deferred_until.as_ref())
                    );
                }
            });
        }
        DeliveryCommand::Replay {
            subscription,
            since_secs,
        } => {
            let msg = pb::ReplayFailedRequest {
                subscription_id: subscription,
                since: Some(seconds_ago(since_secs)),
                until: None,
            };
            let res = api.replay_failed(request(&client, msg)?).await;
            let replayed = res.map_err(rpc)?.into_inner().replayed;
            format.one(&json!({ "replayed": replayed }), || {
                println!("{replayed} failed deliveries queued again");
            });
        }
    }
    Ok(())
}
