//! The live view: the page holds an empty table that `live.js` fills from
//! `/console/live/events`, the WatchDeliveries stream of the session's principal as
//! server-sent events (one JSON object per changed delivery). The browser reconnects by
//! itself when the stream ends; every reconnection checks the session again.

use std::convert::Infallible;

use axum::extract::Query;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use hookline_proto::v1 as pb;
use maud::html;
use serde::Deserialize;

use crate::layout;
use crate::pages::{pick_tenant, tenant_of};
use crate::session::Ctx;
use crate::view::{self, PageError, ts};

#[derive(Deserialize, Default)]
pub(crate) struct LiveQuery {
    #[serde(default)]
    tenant: String,
    #[serde(default)]
    subscription: String,
}

pub(crate) async fn page(mut ctx: Ctx, Query(q): Query<LiveQuery>) -> Result<Response, PageError> {
    let Some(tenant) = tenant_of(&ctx, &q.tenant) else {
        let pick = pick_tenant(&mut ctx, "/console/live").await?;
        return Ok(layout::page(&ctx, "Live", pick).into_response());
    };
    let src = format!(
        "/console/live/events?tenant={}&subscription={}",
        urlencode(&tenant),
        urlencode(&q.subscription)
    );
    let body = html! {
        p { "Deliveries of tenant " code { (tenant) } " as they change. " span id="live-state" { "connecting…" } }
        table id="live" data-src=(src) {
            thead { tr { th { "delivery" } th { "event type" } th { "status" } th { "attempts" } th { "last code" } th { "updated" } } }
            tbody {}
        }
        script src="/console/assets/live.js" {}
    };
    Ok(layout::page(&ctx, "Live", body).into_response())
}

/// Ids and the like only: anything else is refused by the service anyway.
fn urlencode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

pub(crate) async fn stream(
    mut ctx: Ctx,
    Query(q): Query<LiveQuery>,
) -> Result<Response, PageError> {
    let req = pb::WatchDeliveriesRequest {
        tenant_id: tenant_of(&ctx, &q.tenant).unwrap_or_default(),
        subscription_id: q.subscription,
    };
    let watch = ctx
        .clients
        .delivery
        .watch_deliveries(req)
        .await?
        .into_inner();
    let events = watch.map(|item| {
        let event = match item {
            Ok(d) => Event::default().event("delivery").data(
                serde_json::json!({
                    "id": d.id,
                    "event_type": d.event_type,
                    "status": view::delivery_status(d.status),
                    "attempts": d.attempt_count,
                    "last_status_code": d.last_status_code,
                    "updated_at": ts(d.updated_at.as_ref()),
                })
                .to_string(),
            ),
            Err(status) => Event::default().event("end").data(status.message()),
        };
        Ok::<_, Infallible>(event)
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}
