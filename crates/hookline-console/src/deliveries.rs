//! Deliveries with filters (status, subscription, event, event type, time) and one
//! delivery's attempts (status, duration, error class, response excerpt), with the retry
//! button. Event type is filtered on the page: the service filters the rest.

use axum::extract::Form;
use axum::extract::{Path, Query};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::{NaiveDateTime, TimeZone, Utc};
use hookline_proto::v1 as pb;
use maud::{Markup, html};
use serde::Deserialize;

use crate::calls::PAGE_SIZE;
use crate::layout::{self, button};
use crate::pages::{pick_tenant, tenant_of};
use crate::session::{CsrfForm, Ctx};
use crate::view::{self, PageError, ts};

/// Characters of a response body shown per attempt.
const RESPONSE_EXCERPT: usize = 300;

#[derive(Deserialize, Default)]
pub(crate) struct Filters {
    #[serde(default)]
    tenant: String,
    #[serde(default)]
    subscription: String,
    #[serde(default)]
    event_id: String,
    #[serde(default)]
    event_type: String,
    /// pending, retrying, succeeded, failed; empty: all.
    #[serde(default)]
    status: String,
    /// `YYYY-MM-DDTHH:MM` (UTC), as a datetime-local input sends it.
    #[serde(default)]
    since: String,
    #[serde(default)]
    until: String,
}

fn status_filter(value: &str) -> Result<pb::DeliveryStatus, PageError> {
    Ok(match value {
        "" => pb::DeliveryStatus::Unspecified,
        "pending" => pb::DeliveryStatus::Pending,
        "retrying" => pb::DeliveryStatus::Retrying,
        "succeeded" => pb::DeliveryStatus::Succeeded,
        "failed" => pb::DeliveryStatus::Failed,
        other => {
            return Err(PageError::bad_request(format!(
                "status is {other:?}; allowed: pending, retrying, succeeded, failed, or empty for all"
            )));
        }
    })
}

/// A `YYYY-MM-DDTHH:MM[:SS]` form field (UTC), as a timestamp; empty: none.
pub(crate) fn time_filter(
    field: &str,
    value: &str,
) -> Result<Option<prost_types::Timestamp>, PageError> {
    if value.is_empty() {
        return Ok(None);
    }
    let parsed = NaiveDateTime::parse_from_str(value, "%Y-%m-%dT%H:%M")
        .or_else(|_| NaiveDateTime::parse_from_str(value, "%Y-%m-%dT%H:%M:%S"))
        .map_err(|_| {
            PageError::bad_request(format!(
                "{field} is {value:?}; expected YYYY-MM-DDTHH:MM (UTC)"
            ))
        })?;
    Ok(Some(hookline_grpc::convert::timestamp(
        Utc.from_utc_datetime(&parsed),
    )))
}

pub(crate) async fn list(mut ctx: Ctx, Query(f): Query<Filters>) -> Result<Response, PageError> {
    let tenant = tenant_of(&ctx, &f.tenant);
    if tenant.is_none() && f.subscription.is_empty() && f.event_id.is_empty() {
        let pick = pick_tenant(&mut ctx, "/console/deliveries").await?;
        return Ok(layout::page(&ctx, "Deliveries", pick).into_response());
    }
    let req = pb::ListDeliveriesRequest {
        tenant_id: tenant.clone().unwrap_or_default(),
        subscription_id: f.subscription.clone(),
        event_id: f.event_id.clone(),
        status: status_filter(&f.status)? as i32,
        since: time_filter("since", &f.since)?,
        until: time_filter("until", &f.until)?,
        page_size: PAGE_SIZE,
        page_token: String::new(),
    };
    let mut list = ctx
        .clients
        .delivery
        .list_deliveries(req)
        .await?
        .into_inner()
        .deliveries;
    if !f.event_type.is_empty() {
        list.retain(|d| d.event_type == f.event_type);
    }
    let body = html! {
        (filter_form(&f, tenant.as_deref().unwrap_or_default()))
        (delivery_table(&list))
    };
    Ok(layout::page(&ctx, "Deliveries", body).into_response())
}

fn filter_form(f: &Filters, tenant: &str) -> Markup {
    html! {
        form method="get" action="/console/deliveries" class="filters" id="filters" {
            input type="hidden" name="tenant" value=(tenant);
            input type="hidden" name="event_id" value=(f.event_id);
            label for="status" { "Status" }
            select id="status" name="status" {
                @for s in ["", "pending", "retrying", "succeeded", "failed"] {
                    option value=(s) selected[s == f.status] { (if s.is_empty() { "all" } else { s }) }
                }
            }
            label for="subscription" { "Subscription" } input id="subscription" name="subscription" value=(f.subscription);
            label for="event_type" { "Event type" } input id="event_type" name="event_type" value=(f.event_type);
            label for="since" { "Since (UTC)" } input id="since" name="since" type="datetime-local" value=(f.since);
            label for="until" { "Until (UTC)" } input id="until" name="until" type="datetime-local" value=(f.until);
            button type="submit" id="apply-filters" { "Filter" }
        }
    }
}

fn delivery_table(list: &[pb::Delivery]) -> Markup {
    html! {
        table id="deliveries" {
            tr { th { "id" } th { "event type" } th { "subscription" } th { "status" } th { "attempts" } th { "last code" } th { "next attempt" } th { "deferred" } th { "updated" } }
            @for d in list {
                tr {
                    td { a href={ "/console/deliveries/" (d.id) } class="delivery-link" { code { (d.id) } } }
                    td { (d.event_type) }
                    td { a href={ "/console/subscriptions/" (d.subscription_id) } { code { (d.subscription_id) } } }
                    td class={ "status " (view::delivery_status(d.status)) } { (view::delivery_status(d.status)) }
                    td { (d.attempt_count) }
                    td { (code_or_dash(d.last_status_code)) }
                    td { (ts(d.next_attempt_at.as_ref())) }
                    td { (d.deferred_reason) }
                    td { (ts(d.updated_at.as_ref())) }
                }
            }
        }
    }
}

fn code_or_dash(code: u32) -> String {
    if code == 0 {
        "—".into()
    } else {
        code.to_string()
    }
}

pub(crate) async fn show(mut ctx: Ctx, Path(id): Path<String>) -> Result<Response, PageError> {
    let answer = ctx
        .clients
        .delivery
        .get_delivery(pb::GetDeliveryRequest {
            delivery_id: id.clone(),
        })
        .await?
        .into_inner();
    let d = answer.delivery.unwrap_or_default();
    let body = html! {
        dl {
            dt { "status" } dd id="delivery-status" class={ "status " (view::delivery_status(d.status)) } { (view::delivery_status(d.status)) }
            dt { "event" } dd { a href={ "/console/events/" (d.event_id) } { code { (d.event_id) } } " " (d.event_type) }
            dt { "subscription" } dd { a href={ "/console/subscriptions/" (d.subscription_id) } { code { (d.subscription_id) } } }
            dt { "next attempt" } dd { (ts(d.next_attempt_at.as_ref())) }
            dt { "deferred" } dd { (d.deferred_reason) " " (ts(d.deferred_until.as_ref())) }
            dt { "last error" } dd { (d.last_error) }
        }
        (button(&ctx, &format!("/console/deliveries/{}/retry", d.id), "Retry now", "retry"))
        h2 { "Attempts" }
        table id="attempts" {
            tr { th { "#" } th { "started" } th { "status" } th { "duration" } th { "error class" } th { "error" } th { "response excerpt" } }
            @for a in &answer.attempts {
                tr class="attempt" {
                    td { (a.attempt_number) }
                    td { (ts(a.started_at.as_ref())) }
                    td { (code_or_dash(a.status_code)) }
                    td { (a.duration_ms) " ms" }
                    td { (view::error_class(a.error_class)) }
                    td { (a.error_message) }
                    td { code { (view::excerpt(&a.response_excerpt, RESPONSE_EXCERPT)) } }
                }
            }
        }
    };
    Ok(layout::page(&ctx, &format!("Delivery {}", d.id), body).into_response())
}

pub(crate) async fn retry(
    mut ctx: Ctx,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Result<Response, PageError> {
    ctx.check_csrf(&f.csrf)?;
    ctx.clients
        .delivery
        .retry_delivery(pb::RetryDeliveryRequest {
            delivery_id: id.clone(),
        })
        .await?;
    Ok(Redirect::to(&format!("/console/deliveries/{id}")).into_response())
}
