//! Publishes one event to a running Hookline server.
//!
//! ```text
//! HOOKLINE_SERVER=127.0.0.1:50051 HOOKLINE_TOKEN=hl_… \
//!     cargo run -p hookline-client --example publish -- ten_… invoice.paid '{"amount":42}'
//! ```

use hookline_client::{Client, Event};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(tenant), Some(event_type), Some(payload)) = (args.next(), args.next(), args.next())
    else {
        return Err("usage: publish <tenant_id> <event_type> <json payload>".into());
    };
    let server = std::env::var("HOOKLINE_SERVER").unwrap_or_else(|_| "127.0.0.1:50051".into());
    let token = std::env::var("HOOKLINE_TOKEN").map_err(|_| "set HOOKLINE_TOKEN")?;
    let client = Client::builder(server).token(token).connect().await?;
    match client
        .publish(Event::new(tenant, event_type, payload))
        .await
    {
        Ok(res) => {
            println!("{}: {} deliveries", res.event_id, res.deliveries_created);
            Ok(())
        }
        Err(e) if e.is_retryable() => Err(format!("try again later: {e}").into()),
        Err(e) => Err(format!("fix the request: {e}").into()),
    }
}
