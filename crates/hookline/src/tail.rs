//! `hookline tail`: follows deliveries as their state changes, and rides out a server
//! restart. When the server stops (its stream ends with `UNAVAILABLE: server shutting
//! down`) or the connection drops, tail says so and reconnects with backoff for at most
//! `--reconnect-secs`; if the server is not back by then it stops, saying so.

use std::time::Duration;

use clap::Args;
use hookline_grpc::status::is_shutting_down;
use hookline_proto::v1 as pb;
use tokio::time::Instant;
use tonic::{Code, Status, Streaming};

use crate::client::output::ts;
use crate::client::{ClientArgs, delivery_json, delivery_row, rpc};

/// The first and the longest pause between reconnection attempts.
const FIRST_PAUSE: Duration = Duration::from_millis(200);
const MAX_PAUSE: Duration = Duration::from_secs(5);

/// `hookline tail`.
#[derive(Debug, Args)]
pub struct TailArgs {
    /// Only deliveries of this tenant (`ten_…`).
    #[arg(long)]
    pub tenant: Option<String>,
    /// Only deliveries to this subscription (`sub_…`).
    #[arg(long)]
    pub subscription: Option<String>,
    /// When the server stops or the connection drops, how long to keep reconnecting, in
    /// seconds; 0 stops at once.
    #[arg(long, default_value_t = 60)]
    pub reconnect_secs: u64,
}

/// Why following stopped.
enum Ended {
    /// The server is stopping (a planned stop).
    ShuttingDown,
    /// The connection broke, or the server ended the stream without a word.
    Lost(String),
}

/// Why (re)opening the stream failed.
enum Failure {
    /// Worth another try: the server is not reachable (yet).
    Retry(String),
    /// Trying again would not help (a wrong key, a process without the retry service).
    Fatal(anyhow::Error),
}

pub async fn tail(args: &ClientArgs, t: TailArgs) -> anyhow::Result<()> {
    let request = pb::WatchDeliveriesRequest {
        tenant_id: t.tenant.unwrap_or_default(),
        subscription_id: t.subscription.unwrap_or_default(),
    };
    let within = Duration::from_secs(t.reconnect_secs);
    // The first connection fails at once: a wrong address is not a restart.
    let mut stream = match open(args, &request).await {
        Ok(s) => s,
        Err(Failure::Retry(why)) => anyhow::bail!("{why}"),
        Err(Failure::Fatal(e)) => return Err(e),
    };
    if !args.format().is_json() {
        eprintln!("following deliveries; Ctrl-C to stop");
    }
    loop {
        let ended = follow(&mut stream, args.format().is_json()).await?;
        let planned = matches!(ended, Ended::ShuttingDown);
        match &ended {
            Ended::ShuttingDown => eprintln!("hookline tail: server shutting down"),
            Ended::Lost(why) => eprintln!("hookline tail: lost the server: {why}"),
        }
        if within.is_zero() {
            return stopped(planned, "");
        }
        eprintln!(
            "hookline tail: reconnecting for up to {}s",
            within.as_secs()
        );
        match reconnect(args, &request, within).await? {
            Some(s) => {
                stream = s;
                eprintln!(
                    "hookline tail: reconnected; following again (changes made while \
                     disconnected are not shown: `hookline deliveries list` has them)"
                );
            }
            None => {
                let why = format!(" (the server was not back within {}s)", within.as_secs());
                return stopped(planned, &why);
            }
        }
    }
}

/// The end of a tail whose server went away: clean after a planned stop, an error after
/// a broken connection.
fn stopped(planned: bool, why: &str) -> anyhow::Result<()> {
    if planned {
        eprintln!("hookline tail: stopped following{why}");
        Ok(())
    } else {
        anyhow::bail!("stopped following{why}")
    }
}

/// Prints deliveries until the stream ends; returns why it ended.
async fn follow(stream: &mut Streaming<pb::Delivery>, json: bool) -> anyhow::Result<Ended> {
    loop {
        let status = match stream.message().await {
            Ok(Some(d)) => {
                print_delivery(&d, json);
                continue;
            }
            Ok(None) => return Ok(Ended::Lost("the server ended the stream".into())),
            Err(status) => status,
        };
        if is_shutting_down(&status) {
            return Ok(Ended::ShuttingDown);
        }
        match classify(status) {
            Failure::Retry(why) => return Ok(Ended::Lost(why)),
            Failure::Fatal(e) => return Err(e),
        }
    }
}

/// Opens the stream again with growing pauses, until `within` has passed (`None`).
async fn reconnect(
    args: &ClientArgs,
    request: &pb::WatchDeliveriesRequest,
    within: Duration,
) -> anyhow::Result<Option<Streaming<pb::Delivery>>> {
    let deadline = Instant::now() + within;
    let mut pause = FIRST_PAUSE;
    loop {
        if Instant::now() + pause >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_PAUSE);
        match tokio::time::timeout_at(deadline, open(args, request)).await {
            Err(_) => return Ok(None),
            Ok(Ok(stream)) => return Ok(Some(stream)),
            Ok(Err(Failure::Fatal(e))) => return Err(e),
            Ok(Err(Failure::Retry(_))) => {}
        }
    }
}

async fn open(
    args: &ClientArgs,
    request: &pb::WatchDeliveriesRequest,
) -> Result<Streaming<pb::Delivery>, Failure> {
    let client = args
        .connect()
        .await
        .map_err(|e| Failure::Retry(format!("{e:#}")))?;
    let req = crate::client::request(&client, request.clone()).map_err(Failure::Fatal)?;
    match client.deliveries().watch_deliveries(req).await {
        Ok(response) => Ok(response.into_inner()),
        Err(status) => Err(classify(status)),
    }
}

/// Connection trouble and a stopping server are worth another try; anything the server
/// said about the request itself is not.
fn classify(status: Status) -> Failure {
    match status.code() {
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded => {
            Failure::Retry(format!("{:?}: {}", status.code(), status.message()))
        }
        _ => Failure::Fatal(rpc(status)),
    }
}

fn print_delivery(d: &pb::Delivery, json: bool) {
    if json {
        println!("{}", delivery_json(d));
        return;
    }
    let row = delivery_row(d);
    println!(
        "{}  {:<9}  attempt {:<2}  {:<5}  {}  {}  {}",
        ts(d.updated_at.as_ref()),
        row[1],
        row[2],
        row[3],
        d.event_type,
        d.id,
        d.subscription_id
    );
}
