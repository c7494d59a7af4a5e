//! The frame of a signed-in page: navigation naming the caller, and the forms that carry
//! the session's CSRF token. Apart from `view` (which knows nothing of sessions) so that
//! the session module can show error pages without the two importing each other.

use maud::{Markup, html};

use crate::session::Ctx;
use crate::view::document;

/// A page with navigation for a signed-in caller.
pub(crate) fn page(ctx: &Ctx, title: &str, body: Markup) -> Markup {
    let who = match (&ctx.principal, ctx.portal) {
        (p, true) => format!(
            "portal · tenant {}",
            p.tenant().map(|t| t.as_str()).unwrap_or("")
        ),
        (p, false) if p.is_admin() => "admin key".to_string(),
        (p, false) => format!(
            "tenant key · {}",
            p.tenant().map(|t| t.as_str()).unwrap_or("")
        ),
    };
    let body = html! {
        nav {
            a href="/console/" class="brand" { "Hookline" }
            a href="/console/tenants" { "Tenants" }
            a href="/console/event-types" { "Event types" }
            a href="/console/events" { "Events" }
            a href="/console/deliveries" { "Deliveries" }
            a href="/console/live" { "Live" }
            span class="who" id="who" { (who) }
            form method="post" action="/console/logout" class="inline" {
                (csrf(ctx))
                button type="submit" id="logout" { "Sign out" }
            }
        }
        main { h1 { (title) } (body) }
    };
    document(title, body)
}

/// The hidden CSRF field of a form.
pub(crate) fn csrf(ctx: &Ctx) -> Markup {
    html! { input type="hidden" name="csrf" value=(ctx.csrf); }
}

/// A one-button form posting to `action`.
pub(crate) fn button(ctx: &Ctx, action: &str, label: &str, id: &str) -> Markup {
    html! {
        form method="post" action=(action) class="inline" {
            (csrf(ctx))
            button type="submit" id=(id) { (label) }
        }
    }
}
