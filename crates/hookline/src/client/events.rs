//! `hookline publish` and `hookline events`: send an event, read events back with
//! their payloads.

use anyhow::Context;
use clap::{Args, Subcommand};
use hookline_client::Event;
use hookline_proto::v1 as pb;
use serde_json::{Value, json};

use super::output::{print_table, seconds_ago, ts};
use super::{ClientArgs, request, rpc};

/// `hookline publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The tenant the event belongs to (`ten_…`).
    #[arg(long)]
    pub tenant: String,
    /// The event type, dot-separated (`invoice.paid`).
    #[arg(long = "type")]
    pub event_type: String,
    /// The JSON payload; `-` reads it from stdin.
    #[arg(long)]
    pub data: String,
    /// Publishing twice with the same key creates the event once (default: a fresh key,
    /// so that the client's own retries never duplicate the event).
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// A channel of the event; repeat for several.
    #[arg(long = "channel")]
    pub channels: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum EventCommand {
    /// Lists a tenant's events, newest first.
    List {
        /// The tenant (`ten_…`).
        #[arg(long)]
        tenant: String,
        /// Only events of this type (`invoice.paid`).
        #[arg(long = "type")]
        event_type: Option<String>,
        /// Only events of the last this many seconds.
        #[arg(long)]
        since_secs: Option<u64>,
        /// At most this many events (1 to 1000).
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Shows one event with its payload.
    Get {
        /// The event's id (`evt_…`).
        id: String,
    },
}

pub async fn publish(args: &ClientArgs, p: PublishArgs) -> anyhow::Result<()> {
    let payload = if p.data == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf).context("reading stdin")?;
        buf
    } else {
        p.data.into_bytes()
    };
    let client = args.connect().await?;
    let mut event = Event::new(p.tenant, p.event_type, payload);
    if let Some(key) = p.idempotency_key {
        event = event.idempotency_key(key);
    }
    for c in p.channels {
        event = event.channel(c);
    }
    let res = client.publish(event).await?;
    let v = json!({
        "event_id": res.event_id,
        "deliveries_created": res.deliveries_created,
        "duplicate": res.duplicate,
    });
    args.format().one(&v, || {
        let dup = if res.duplicate {
            " (duplicate: nothing new created)"
        } else {
            ""
        };
        println!(
            "{}  {} deliveries{dup}",
            res.event_id, res.deliveries_created
        );
    });
    Ok(())
}

/// The payload as JSON when it is JSON (as published), else as text.
fn payload_json(payload: &[u8]) -> Value {
    serde_json::from_slice(payload)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(payload).into_owned()))
}

fn event_json(e: &pb::Event) -> Value {
    json!({
        "id": e.id,
        "tenant_id": e.tenant_id,
        "event_type": e.event_type,
        "channels": e.channels,
        "idempotency_key": e.idempotency_key,
        "created_at": ts(e.created_at.as_ref()),
        "payload": payload_json(&e.payload),
    })
}

const HEADERS: [&str; 4] = ["ID", "TYPE", "CREATED", "PAYLOAD"];

fn event_row(e: &pb::Event) -> Vec<String> {
    vec![
        e.id.clone(),
        e.event_type.clone(),
        ts(e.created_at.as_ref()),
        String::from_utf8_lossy(&e.payload).into_owned(),
    ]
}

pub async fn events(args: &ClientArgs, cmd: EventCommand) -> anyhow::Result<()> {
    let client = args.connect().await?;
    let mut ingest = client.ingest();
    let format = args.format();
    match cmd {
        EventCommand::List {
            tenant,
            event_type,
            since_secs,
            limit,
        } => {
            let msg = pb::ListEventsRequest {
                tenant_id: tenant,
                event_type: event_type.unwrap_or_default(),
                since: since_secs.map(seconds_ago),
                until: None,
                page_size: limit,
                page_token: String::new(),
            };
            let page = ingest.list_events(request(&client, msg)?).await;
            let events = page.map_err(rpc)?.into_inner().events;
            format.items(&events, event_json, &HEADERS, event_row);
        }
        EventCommand::Get { id } => {
            let msg = pb::GetEventRequest { event_id: id };
            let e = ingest.get_event(request(&client, msg)?).await;
            let e = e.map_err(rpc)?.into_inner();
            let v = event_json(&e);
            format.one(&v, || {
                print_table(&HEADERS[..3], vec![event_row(&e)[..3].to_vec()]);
                let pretty = serde_json::to_string_pretty(&v["payload"]).unwrap_or_default();
                println!("\npayload:\n{pretty}");
            });
        }
    }
    Ok(())
}
