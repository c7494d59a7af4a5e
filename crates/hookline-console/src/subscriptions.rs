//! A subscription's page and its actions: create, edit, enable or disable, rotate the
//! secret, send a test event, replay failed deliveries. Each action is one call to the
//! registry, ingest or delivery service as the session's principal.

use axum::extract::{Form, Path};
use axum::response::{IntoResponse, Redirect, Response};
use hookline_proto::v1 as pb;
use maud::html;
use serde::Deserialize;

use crate::deliveries::time_filter;
use crate::layout::{self, button, csrf};
use crate::session::{CsrfForm, Ctx};
use crate::view::{self, PageError, ts};

/// Event types from a comma-separated field.
fn event_types(field: &str) -> Vec<String> {
    field
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

#[derive(Deserialize)]
pub(crate) struct SubscriptionForm {
    csrf: String,
    #[serde(default)]
    tenant_id: String,
    url: String,
    #[serde(default)]
    event_types: String,
    #[serde(default)]
    description: String,
}

pub(crate) async fn create(
    mut ctx: Ctx,
    Form(f): Form<SubscriptionForm>,
) -> Result<Response, PageError> {
    ctx.check_csrf(&f.csrf)?;
    let created = ctx
        .clients
        .registry
        .create_subscription(pb::CreateSubscriptionRequest {
            subscription: Some(pb::Subscription {
                tenant_id: f.tenant_id,
                url: f.url,
                event_types: event_types(&f.event_types),
                description: f.description,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?
        .into_inner();
    let s = created.subscription.unwrap_or_default();
    let body = html! {
        p { "Subscription " a id="subscription-link" href={ "/console/subscriptions/" (s.id) } { code { (s.id) } } " created." }
        p { "Its signing secret, shown this once:" } pre id="secret" { (created.secret) }
    };
    Ok(layout::page(&ctx, "Subscription created", body).into_response())
}

pub(crate) async fn show(mut ctx: Ctx, Path(id): Path<String>) -> Result<Response, PageError> {
    let s = ctx.clients.subscription(&id).await?;
    let enabled = s.state == pb::SubscriptionState::Enabled as i32;
    let base = format!("/console/subscriptions/{}", s.id);
    let day_ago = (chrono::Utc::now() - chrono::Duration::days(1)).format("%Y-%m-%dT%H:%M");
    let body = html! {
        dl {
            dt { "tenant" } dd { a href={ "/console/tenants/" (s.tenant_id) } { code { (s.tenant_id) } } }
            dt { "state" } dd id="state" { (view::subscription_state(s.state)) " " (s.disabled_reason) }
            dt { "circuit open until" } dd id="circuit" { (ts(s.circuit_open_until.as_ref())) }
            dt { "created" } dd { (ts(s.created_at.as_ref())) }
        }
        p {
            a href={ "/console/deliveries?tenant=" (s.tenant_id) "&subscription=" (s.id) } { "Deliveries" } " · "
            a href={ "/console/live?tenant=" (s.tenant_id) "&subscription=" (s.id) } { "Live view" }
        }
        div class="actions" {
            @if enabled { (button(&ctx, &format!("{base}/state?enable=false"), "Disable", "disable")) }
            @else { (button(&ctx, &format!("{base}/state?enable=true"), "Enable", "enable")) }
            (button(&ctx, &format!("{base}/rotate"), "Rotate secret", "rotate"))
        }
        h2 { "Edit" }
        form method="post" action=(base) class="card" {
            (csrf(&ctx))
            label for="url" { "URL" } input id="url" name="url" type="url" required value=(s.url) maxlength="2048";
            label for="event_types" { "Event types" } input id="event_types" name="event_types" value=(s.event_types.join(", "));
            label for="description" { "Description" } input id="description" name="description" value=(s.description);
            button type="submit" id="save" { "Save" }
        }
        h2 { "Replay failed deliveries" }
        form method="post" action={ (base) "/replay" } class="card" {
            (csrf(&ctx))
            label for="since" { "Failed since (UTC)" }
            input id="since" name="since" type="datetime-local" required value=(day_ago);
            button type="submit" id="replay" { "Replay failed deliveries" }
        }
        h2 { "Send a test event" }
        form method="post" action={ (base) "/test" } class="card" {
            (csrf(&ctx))
            p class="hint" { "Published to the tenant like any event: every subscription that listens to the type receives it." }
            label for="test_type" { "Event type" } input id="test_type" name="event_type" required value=(s.event_types.iter().find(|t| !t.contains('*')).cloned().unwrap_or_else(|| "console.test".into()));
            label for="payload" { "Payload (JSON)" } textarea id="payload" name="payload" rows="4" { "{\"test\": true}" }
            button type="submit" id="send-test" { "Send test event" }
        }
    };
    Ok(layout::page(&ctx, &format!("Subscription {}", s.id), body).into_response())
}

pub(crate) async fn edit(
    mut ctx: Ctx,
    Path(id): Path<String>,
    Form(f): Form<SubscriptionForm>,
) -> Result<Response, PageError> {
    ctx.check_csrf(&f.csrf)?;
    let patch = pb::Subscription {
        id: id.clone(),
        url: f.url,
        event_types: event_types(&f.event_types),
        description: f.description,
        ..Default::default()
    };
    update(&mut ctx, patch, &["url", "event_types", "description"]).await?;
    Ok(Redirect::to(&format!("/console/subscriptions/{id}")).into_response())
}

async fn update(ctx: &mut Ctx, patch: pb::Subscription, paths: &[&str]) -> Result<(), PageError> {
    ctx.clients
        .registry
        .update_subscription(pb::UpdateSubscriptionRequest {
            subscription: Some(patch),
            update_mask: Some(prost_types::FieldMask {
                paths: paths.iter().map(|p| p.to_string()).collect(),
            }),
        })
        .await?;
    Ok(())
}

#[derive(Deserialize)]
pub(crate) struct StateQuery {
    enable: bool,
}

pub(crate) async fn set_state(
    mut ctx: Ctx,
    Path(id): Path<String>,
    axum::extract::Query(q): axum::extract::Query<StateQuery>,
    Form(f): Form<CsrfForm>,
) -> Result<Response, PageError> {
    ctx.check_csrf(&f.csrf)?;
    let state = if q.enable {
        pb::SubscriptionState::Enabled
    } else {
        pb::SubscriptionState::Disabled
    };
    let patch = pb::Subscription {
        id: id.clone(),
        state: state as i32,
        ..Default::default()
    };
    update(&mut ctx, patch, &["state"]).await?;
    Ok(Redirect::to(&format!("/console/subscriptions/{id}")).into_response())
}

pub(crate) async fn rotate(
    mut ctx: Ctx,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Result<Response, PageError> {
    ctx.check_csrf(&f.csrf)?;
    let secret = ctx
        .clients
        .registry
        .rotate_secret(pb::RotateSecretRequest {
            subscription_id: id.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .secret;
    let body = html! {
        p { "The new signing secret, shown this once (the old one stays valid for the default grace period):" }
        pre id="secret" { (secret) }
        p { a href={ "/console/subscriptions/" (id) } { "Back to the subscription" } }
    };
    Ok(layout::page(&ctx, "Secret rotated", body).into_response())
}

#[derive(Deserialize)]
pub(crate) struct TestForm {
    csrf: String,
    event_type: String,
    payload: String,
}

pub(crate) async fn send_test(
    mut ctx: Ctx,
    Path(id): Path<String>,
    Form(f): Form<TestForm>,
) -> Result<Response, PageError> {
    ctx.check_csrf(&f.csrf)?;
    let s = ctx.clients.subscription(&id).await?;
    let published = ctx
        .clients
        .ingest
        .publish(pb::PublishRequest {
            tenant_id: s.tenant_id.clone(),
            event_type: f.event_type,
            payload: f.payload.into_bytes(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let body = html! {
        p id="published" { "Event " a href={ "/console/events/" (published.event_id) } { code { (published.event_id) } }
          " published; " (published.deliveries_created) " deliveries created." }
        p { a href={ "/console/deliveries?tenant=" (s.tenant_id) "&subscription=" (id) } { "See the deliveries" } }
    };
    Ok(layout::page(&ctx, "Test event sent", body).into_response())
}

#[derive(Deserialize)]
pub(crate) struct ReplayForm {
    csrf: String,
    /// `YYYY-MM-DDTHH:MM` (UTC).
    since: String,
}

pub(crate) async fn replay(
    mut ctx: Ctx,
    Path(id): Path<String>,
    Form(f): Form<ReplayForm>,
) -> Result<Response, PageError> {
    ctx.check_csrf(&f.csrf)?;
    let n = ctx
        .clients
        .delivery
        .replay_failed(pb::ReplayFailedRequest {
            subscription_id: id.clone(),
            since: time_filter("since", &f.since)?,
            until: None,
        })
        .await?
        .into_inner()
        .replayed;
    let body = html! {
        p id="replayed" { (n) " failed deliveries queued again." }
        p { a href={ "/console/deliveries?subscription=" (id) } { "See the deliveries" } }
    };
    Ok(layout::page(&ctx, "Replay", body).into_response())
}
