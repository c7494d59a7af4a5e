//! The registry's and ingest's pages: overview with queue depths, tenants (with their
//! subscriptions and the portal-link form), event types, and events with payloads.

use axum::extract::{Form, Path, Query};
use axum::response::{IntoResponse, Redirect, Response};
use hookline_broker::{QueueKind, QueueName};
use hookline_proto::v1 as pb;
use maud::{Markup, html};
use serde::Deserialize;

use crate::State;
use crate::calls::PAGE_SIZE;
use crate::layout::{self, csrf};
use crate::session::Ctx;
use crate::view::{self, PageError, ts};

/// Characters of a payload shown in a list.
const PAYLOAD_EXCERPT: usize = 120;

/// `?tenant=…` on list pages.
#[derive(Deserialize, Default)]
pub(crate) struct TenantQuery {
    #[serde(default)]
    pub tenant: String,
    #[serde(default)]
    pub event_type: String,
}

/// The tenant a list is for: the one asked for, else the caller's own. A tenant key
/// asking for another tenant is passed on: the service refuses it.
pub(crate) fn tenant_of(ctx: &Ctx, asked: &str) -> Option<String> {
    if !asked.is_empty() {
        return Some(asked.to_string());
    }
    ctx.own_tenant().map(|t| t.as_str().to_string())
}

/// For an admin who named no tenant: links to pick one.
pub(crate) async fn pick_tenant(ctx: &mut Ctx, path: &str) -> Result<Markup, PageError> {
    let tenants = ctx.clients.tenants().await?;
    Ok(html! {
        p { "Choose a tenant:" }
        ul { @for t in &tenants { li { a href={ (path) "?tenant=" (t.id) } { (t.name) " " code { (t.id) } } } } }
    })
}

pub(crate) async fn overview(state: State, mut ctx: Ctx) -> Result<Response, PageError> {
    let depths = if ctx.principal.is_admin() {
        let mut rows = Vec::new();
        // One row per kind: its unsharded queue and every shard queue together.
        let broker = &state.0.broker;
        for kind in QueueKind::ALL {
            let mut total = Some(0u64);
            for queue in QueueName::consumed(broker.delivery_shards()) {
                if queue.kind() == kind {
                    let depth = broker.queue_depth(queue).await.ok();
                    total = total.zip(depth).map(|(a, b)| a + b);
                }
            }
            rows.push((kind.as_str().to_string(), total));
        }
        rows.push((
            "dead letters".into(),
            state.0.broker.dead_letter_depth().await.ok(),
        ));
        Some(rows)
    } else {
        None
    };
    let own = match ctx.own_tenant().cloned() {
        Some(t) => Some(ctx.clients.tenant(t.as_str()).await?),
        None => None,
    };
    let body = html! {
        @if let Some(rows) = depths {
            h2 { "Queue depth" }
            table id="queues" { tr { th { "queue" } th { "messages" } }
                @for (name, depth) in rows {
                    tr { td { (name) } td { (depth.map(|d| d.to_string()).unwrap_or_else(|| "unavailable".into())) } }
                }
            }
            p { a href="/console/tenants" { "Tenants" } }
        }
        @if let Some(t) = own {
            p { "Tenant " a href={ "/console/tenants/" (t.id) } { (t.name) } " " code { (t.id) } }
        }
    };
    Ok(layout::page(&ctx, "Overview", body).into_response())
}

pub(crate) async fn tenants(mut ctx: Ctx) -> Result<Response, PageError> {
    let list = match ctx.own_tenant().cloned() {
        Some(own) => vec![ctx.clients.tenant(own.as_str()).await?],
        None => ctx.clients.tenants().await?,
    };
    let body = html! {
        table id="tenants" {
            tr { th { "name" } th { "id" } }
            @for t in &list { tr { td { a href={ "/console/tenants/" (t.id) } { (t.name) } } td { code { (t.id) } } } }
        }
        @if ctx.principal.is_admin() {
            h2 { "New tenant" }
            form method="post" action="/console/tenants" class="card" {
                (csrf(&ctx))
                label for="name" { "Name" } input id="name" name="name" required maxlength="200";
                button type="submit" id="create-tenant" { "Create tenant" }
            }
        }
    };
    Ok(layout::page(&ctx, "Tenants", body).into_response())
}

#[derive(Deserialize)]
pub(crate) struct NameForm {
    csrf: String,
    name: String,
    #[serde(default)]
    description: String,
}

pub(crate) async fn create_tenant(
    mut ctx: Ctx,
    Form(f): Form<NameForm>,
) -> Result<Response, PageError> {
    ctx.check_csrf(&f.csrf)?;
    let t = ctx
        .clients
        .registry
        .create_tenant(pb::CreateTenantRequest {
            name: f.name,
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(Redirect::to(&format!("/console/tenants/{}", t.id)).into_response())
}

pub(crate) async fn tenant(mut ctx: Ctx, Path(id): Path<String>) -> Result<Response, PageError> {
    let t = ctx.clients.tenant(&id).await?;
    let subs = ctx
        .clients
        .registry
        .list_subscriptions(pb::ListSubscriptionsRequest {
            tenant_id: id.clone(),
            page_size: PAGE_SIZE,
            page_token: String::new(),
        })
        .await?
        .into_inner()
        .subscriptions;
    let body = html! {
        p { "Tenant " code id="tenant-id" { (t.id) } }
        p {
            a href={ "/console/deliveries?tenant=" (t.id) } { "Deliveries" } " · "
            a href={ "/console/events?tenant=" (t.id) } { "Events" } " · "
            a href={ "/console/live?tenant=" (t.id) } id="live-link" { "Live view" }
        }
        h2 { "Subscriptions" }
        (subscription_table(&subs))
        h2 { "New subscription" }
        form method="post" action="/console/subscriptions" class="card" id="new-subscription" {
            (csrf(&ctx))
            input type="hidden" name="tenant_id" value=(t.id);
            label for="url" { "URL" } input id="url" name="url" type="url" required maxlength="2048";
            label for="event_types" { "Event types (comma-separated; * for all)" }
            input id="event_types" name="event_types" value="*" maxlength="2000";
            label for="description" { "Description" } input id="description" name="description" maxlength="500";
            button type="submit" id="create-subscription" { "Create subscription" }
        }
        h2 { "Portal link" }
        form method="post" action="/console/portal-links" class="card" {
            (csrf(&ctx))
            input type="hidden" name="tenant_id" value=(t.id);
            label for="ttl_secs" { "Valid for (seconds, 5 to the configured maximum)" }
            input id="ttl_secs" name="ttl_secs" type="number" value="900" min="5";
            button type="submit" id="create-portal-link" { "Create portal link" }
        }
    };
    Ok(layout::page(&ctx, &format!("Tenant {}", t.name), body).into_response())
}

/// Subscriptions with their state and circuit.
pub(crate) fn subscription_table(subs: &[pb::Subscription]) -> Markup {
    html! {
        table id="subscriptions" {
            tr { th { "id" } th { "url" } th { "event types" } th { "state" } th { "circuit open until" } }
            @for s in subs {
                tr {
                    td { a href={ "/console/subscriptions/" (s.id) } { code { (s.id) } } }
                    td { (s.url) } td { (s.event_types.join(", ")) }
                    td class={ "state " (view::subscription_state(s.state)) } { (view::subscription_state(s.state)) }
                    td { (ts(s.circuit_open_until.as_ref())) }
                }
            }
        }
    }
}

pub(crate) async fn event_types(mut ctx: Ctx) -> Result<Response, PageError> {
    let list = ctx
        .clients
        .registry
        .list_event_types(pb::ListEventTypesRequest {
            include_archived: true,
            page_size: PAGE_SIZE,
            page_token: String::new(),
        })
        .await?
        .into_inner()
        .event_types;
    let body = html! {
        table id="event-types" {
            tr { th { "name" } th { "description" } th { "schema" } th { "archived" } }
            @for e in &list {
                tr { td { code { (e.name) } } td { (e.description) } td { (if e.schema.is_empty() { "—" } else { "yes" }) } td { (e.archived) } }
            }
        }
        @if ctx.principal.is_admin() {
            h2 { "New event type" }
            form method="post" action="/console/event-types" class="card" {
                (csrf(&ctx))
                label for="name" { "Name" } input id="name" name="name" required maxlength="200";
                label for="description" { "Description" } input id="description" name="description" maxlength="500";
                button type="submit" id="create-event-type" { "Create event type" }
            }
        }
    };
    Ok(layout::page(&ctx, "Event types", body).into_response())
}

pub(crate) async fn create_event_type(
    mut ctx: Ctx,
    Form(f): Form<NameForm>,
) -> Result<Response, PageError> {
    ctx.check_csrf(&f.csrf)?;
    ctx.clients
        .registry
        .create_event_type(pb::CreateEventTypeRequest {
            name: f.name,
            description: f.description,
            schema: String::new(),
        })
        .await?;
    Ok(Redirect::to("/console/event-types").into_response())
}

pub(crate) async fn events(
    mut ctx: Ctx,
    Query(q): Query<TenantQuery>,
) -> Result<Response, PageError> {
    let Some(tenant) = tenant_of(&ctx, &q.tenant) else {
        let pick = pick_tenant(&mut ctx, "/console/events").await?;
        return Ok(layout::page(&ctx, "Events", pick).into_response());
    };
    let list = ctx
        .clients
        .ingest
        .list_events(pb::ListEventsRequest {
            tenant_id: tenant.clone(),
            event_type: q.event_type.clone(),
            page_size: PAGE_SIZE,
            ..Default::default()
        })
        .await?
        .into_inner()
        .events;
    let body = html! {
        form method="get" action="/console/events" class="filters" {
            input type="hidden" name="tenant" value=(tenant);
            label for="event_type" { "Event type" } input id="event_type" name="event_type" value=(q.event_type);
            button type="submit" { "Filter" }
        }
        table id="events" {
            tr { th { "id" } th { "type" } th { "payload" } th { "deliveries" } }
            @for e in &list {
                tr {
                    td { a href={ "/console/events/" (e.id) } { code { (e.id) } } }
                    td { (e.event_type) }
                    td { code { (view::excerpt(&e.payload, PAYLOAD_EXCERPT)) } }
                    td { a href={ "/console/deliveries?tenant=" (e.tenant_id) "&event_id=" (e.id) } { "deliveries" } }
                }
            }
        }
    };
    Ok(layout::page(&ctx, "Events", body).into_response())
}

pub(crate) async fn event(mut ctx: Ctx, Path(id): Path<String>) -> Result<Response, PageError> {
    let e = ctx
        .clients
        .ingest
        .get_event(pb::GetEventRequest { event_id: id })
        .await?
        .into_inner();
    let payload = serde_json::from_slice::<serde_json::Value>(&e.payload)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| String::from_utf8_lossy(&e.payload).into_owned());
    let body = html! {
        dl {
            dt { "id" } dd { code { (e.id) } }
            dt { "tenant" } dd { a href={ "/console/tenants/" (e.tenant_id) } { code { (e.tenant_id) } } }
            dt { "type" } dd { (e.event_type) }
            dt { "idempotency key" } dd { (e.idempotency_key) }
            dt { "channels" } dd { (e.channels.join(", ")) }
        }
        h2 { "Payload" }
        pre id="payload" { (payload) }
        p { a href={ "/console/deliveries?tenant=" (e.tenant_id) "&event_id=" (e.id) } { "Its deliveries" } }
    };
    Ok(layout::page(&ctx, "Event", body).into_response())
}
