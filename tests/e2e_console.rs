//! The web console and tenant portal in a real browser (Chromium over WebDriver) against
//! the real `hookline` binary and a real local receiver: sign in with a key, create a
//! subscription, see a delivery appear live, open its attempts, retry it and see the
//! second attempt; a tenant key sees its own tenant only; a portal link opens one tenant
//! without a key and stops working when it expires. The CSRF token, the cookie flags and
//! sign-out are checked over plain HTTP. Screenshots land in target/console-screenshots/.

#[macro_use]
mod support;

use hookline_proto::v1 as pb;
use support::browser::Browser;
use support::receiver::{Behavior, Receiver};
use support::{Backend, Env, Server, authed};

/// Signs portal links in these tests.
const PORTAL_SECRET: &str = "console-test-secret-of-at-least-32-characters";

async fn start(env: &Env) -> (Server, String, String) {
    let admin = env.admin_key().await;
    let server = env
        .serve_with(
            "all",
            &[
                ("HOOKLINE_CONSOLE_ADDR", "127.0.0.1:0"),
                ("HOOKLINE_CONSOLE_PORTAL_SECRET", PORTAL_SECRET),
            ],
        )
        .await;
    let console = server.console.clone().expect("the console's address");
    (server, admin, console)
}

async fn sign_in(b: &Browser, console: &str, key: &str) {
    b.goto(&format!("{console}/console/")).await;
    b.fill("#api_key", key).await;
    b.click("#login").await;
    b.find("#who").await;
}

async fn sign_out(b: &Browser) {
    b.click("#logout").await;
    b.find("#api_key").await;
}

/// Creates tenant `name` in the browser; returns its id.
async fn create_tenant(b: &Browser, console: &str, name: &str) -> String {
    b.goto(&format!("{console}/console/tenants")).await;
    b.fill("#name", name).await;
    b.click("#create-tenant").await;
    b.text("#tenant-id").await
}

async fn publish(server: &Server, admin: &str, tenant: &str) -> String {
    let channel = support::channel(server).await;
    pb::ingest_service_client::IngestServiceClient::new(channel)
        .publish(authed(
            pb::PublishRequest {
                tenant_id: tenant.into(),
                event_type: "order.created".into(),
                payload: br#"{"order": 42, "total": "19.90"}"#.to_vec(),
                ..Default::default()
            },
            admin,
        ))
        .await
        .expect("publish")
        .into_inner()
        .event_id
}

async fn console_in_a_browser(backend: Backend) {
    let b = Browser::start().await;
    let env = Env::with(backend).await;
    let (server, admin, console) = start(&env).await;
    let receiver = Receiver::start().await;
    // Screenshots from the embedded run only.
    let shots = matches!(backend, Backend::Embedded);
    let tenant = live_delivery_and_retry(&b, &server, &admin, &console, &receiver, shots).await;
    browse(&b, &console, &tenant, shots).await;
    let other = tenant_scoping(&b, &server, &admin, &console, &tenant).await;
    portal_link(&b, &console, &tenant, &other, shots).await;
    b.close().await;
    server.terminate().await;
    env.finish().await;
}

/// Saves a screenshot when `on`.
async fn shot(b: &Browser, on: bool, name: &str) {
    if on {
        b.screenshot(name).await;
    }
}

/// Signs in as admin, subscribes a tenant to the receiver, sees the delivery live, and
/// retries it from its attempts page; returns the tenant.
async fn live_delivery_and_retry(
    b: &Browser,
    server: &Server,
    admin: &str,
    console: &str,
    receiver: &Receiver,
    shots: bool,
) -> String {
    b.goto(&format!("{console}/console/")).await;
    assert!(
        b.url().await.ends_with("/console/login"),
        "not signed in: sent to the login page"
    );
    shot(b, shots, "login").await;
    sign_in(b, console, admin).await;
    assert_eq!(b.text("#who").await, "admin key");
    shot(b, shots, "overview").await;

    // A subscription to the receiver, made in the browser. The first answer is 429 with
    // an hour's Retry-After: only the retry button brings the second attempt now.
    let tenant = create_tenant(b, console, "acme").await;
    let url = receiver.endpoint("console", Behavior::TooManyTimes(1, 3600));
    b.fill("#url", &url).await;
    b.click("#create-subscription").await;
    receiver.set_secret("console", &b.text("#secret").await);
    b.click("#subscription-link").await;
    assert_eq!(b.text("#state").await.trim(), "enabled");
    shot(b, shots, "subscription").await;

    // The live view shows the delivery as it is made and attempted.
    b.goto(&format!("{console}/console/live?tenant={tenant}"))
        .await;
    b.find_xpath("//span[@id='live-state' and text()='live']")
        .await;
    publish(server, admin, &tenant).await;
    b.find("tr.live-delivery").await;
    // The first attempt was answered 429: the row turns to retrying.
    b.find_xpath("//tr[@class='live-delivery']/td[text()='retrying']")
        .await;
    shot(b, shots, "live").await;

    // Its attempts, then the retry button and the second attempt.
    b.click("tr.live-delivery a").await;
    b.find("#attempts").await;
    assert_eq!(b.count("tr.attempt").await, 1);
    assert!(b.text("#attempts").await.contains("429"));
    b.click("#retry").await;
    b.reload_until("a second, successful attempt", |page| {
        page.matches("class=\"attempt\"").count() == 2 && page.contains("status succeeded")
    })
    .await;
    receiver
        .wait_for("console", support::browser::WAIT, "two requests", |r| {
            r.len() == 2
        })
        .await;
    shot(b, shots, "delivery").await;
    tenant
}

/// The deliveries with filters, the events and their payloads, event types and the
/// tenant's page.
async fn browse(b: &Browser, console: &str, tenant: &str, shots: bool) {
    // Filters: succeeded lists it, failed does not.
    b.goto(&format!(
        "{console}/console/deliveries?tenant={tenant}&status=succeeded&event_type=order.created"
    ))
    .await;
    assert_eq!(b.count("#deliveries a.delivery-link").await, 1);
    shot(b, shots, "deliveries").await;
    b.goto(&format!(
        "{console}/console/deliveries?tenant={tenant}&status=failed"
    ))
    .await;
    assert_eq!(b.count("#deliveries a.delivery-link").await, 0);
    b.goto(&format!(
        "{console}/console/deliveries?tenant={tenant}&since=2099-01-01T00:00"
    ))
    .await;
    assert_eq!(b.count("#deliveries a.delivery-link").await, 0);
    b.goto(&format!("{console}/console/events?tenant={tenant}"))
        .await;
    assert!(b.text("#events").await.contains("\"order\": 42"));
    shot(b, shots, "events").await;
    // An event's payload in full, and the catalogue of event types.
    b.click("#events td a").await;
    assert!(b.text("#payload").await.contains("\"total\": \"19.90\""));
    b.goto(&format!("{console}/console/event-types")).await;
    b.find("#event-types").await;
    b.goto(&format!("{console}/console/tenants/{tenant}")).await;
    assert!(b.text("#subscriptions").await.contains("enabled"));
    shot(b, shots, "tenant").await;
    subscription_actions(b).await;
}

/// Disable, enable, edit, rotate the secret and send a test event, from the
/// subscription's page.
async fn subscription_actions(b: &Browser) {
    b.click("#subscriptions td a").await;
    // Each waits for the page the form leads to, not the one it was on.
    b.click("#disable").await;
    b.find_xpath("//dd[@id='state'][starts-with(normalize-space(.), 'disabled')]")
        .await;
    b.click("#enable").await;
    b.find_xpath("//dd[@id='state'][starts-with(normalize-space(.), 'enabled')]")
        .await;
    b.fill("#description", "orders of acme").await;
    b.click("#save").await;
    b.reload_until("the description saved", |page| {
        page.contains("value=\"orders of acme\"")
    })
    .await;
    let page = b.url().await;
    b.click("#rotate").await;
    assert!(b.text("#secret").await.starts_with("whsec_"));
    b.goto(&page).await;
    b.click("#replay").await;
    assert!(b.text("#replayed").await.starts_with("0 failed deliveries"));
    b.goto(&page).await;
    b.fill("#test_type", "order.test").await;
    b.click("#send-test").await;
    assert!(b.text("#published").await.contains("1 deliveries created"));
}

/// A tenant key sees its own tenant only; returns the other tenant, which has data.
async fn tenant_scoping(
    b: &Browser,
    server: &Server,
    admin: &str,
    console: &str,
    tenant: &str,
) -> String {
    let other = create_tenant(b, console, "globex").await;
    b.fill("#url", "http://127.0.0.1:9/other").await;
    b.click("#create-subscription").await;
    publish(server, admin, &other).await;
    let channel = support::channel(server).await;
    let mut registry = pb::registry_service_client::RegistryServiceClient::new(channel);
    let key = registry
        .create_api_key(authed(
            pb::CreateApiKeyRequest {
                name: "console".into(),
                tenant_id: tenant.into(),
            },
            admin,
        ))
        .await
        .expect("a tenant key")
        .into_inner()
        .token;
    sign_out(b).await;

    sign_in(b, console, &key).await;
    assert!(b.text("#who").await.starts_with("tenant key"));
    b.goto(&format!("{console}/console/tenants")).await;
    let listed = b.text("#tenants").await;
    assert!(
        listed.contains(tenant) && !listed.contains(&other),
        "{listed}"
    );
    for path in [
        format!("/console/tenants/{other}"),
        format!("/console/deliveries?tenant={other}"),
        format!("/console/events?tenant={other}"),
        format!("/console/live/events?tenant={other}"),
    ] {
        b.goto(&format!("{console}{path}")).await;
        let page = b.source().await;
        assert!(
            page.contains("id=\"error\"") && !page.contains("order.created"),
            "{path} showed: {page}"
        );
    }
    other
}

/// A portal link opens the tenant without a key until it expires.
async fn portal_link(b: &Browser, console: &str, tenant: &str, other: &str, shots: bool) {
    // Made by the tenant key for its own tenant, fifteen seconds long (the checks below fit in it, the wait for its end too).
    b.goto(&format!("{console}/console/tenants/{tenant}")).await;
    b.fill("#ttl_secs", "15").await;
    b.click("#create-portal-link").await;
    let link = b
        .find("#portal-link")
        .await
        .attr("href")
        .await
        .expect("href")
        .expect("a link");
    sign_out(b).await;
    b.goto(&link).await;
    assert!(b.text("#who").await.starts_with("portal"));
    b.goto(&format!("{console}/console/deliveries?tenant={tenant}"))
        .await;
    assert!(b.count("#deliveries a.delivery-link").await >= 1);
    shot(b, shots, "portal").await;
    // The live view works without a key too.
    b.goto(&format!("{console}/console/live")).await;
    b.find_xpath("//span[@id='live-state' and text()='live']")
        .await;
    b.goto(&format!("{console}/console/tenants/{other}")).await;
    b.find("#error").await;
    // Expired: the session ends and the link no longer opens.
    b.goto(&format!("{console}/console/tenants")).await;
    b.reload_until("signed out at the link's expiry", |page| {
        page.contains("id=\"api_key\"")
    })
    .await;
    b.goto(&link).await;
    assert!(b.text("#error").await.contains("expired"));
}

on_both_backends!(console_in_a_browser);

/// The CSRF token, the cookie flags and sign-out, over plain HTTP.
#[tokio::test]
async fn forms_need_the_session_csrf_token_and_cookies_are_locked_down() {
    let env = Env::with(Backend::Embedded).await;
    let (server, admin, console) = start(&env).await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let session = sign_in_over_http(&http, &console, &admin).await;
    let overview = http
        .get(format!("{console}/console/"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(overview.status(), 200);
    let csrf = hidden_csrf(&overview.text().await.unwrap());
    // A form without this session's token changes nothing.
    let forged = http
        .post(format!("{console}/console/tenants"))
        .header("cookie", &session)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[("csrf", "forged"), ("name", "evil")]))
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403);
    let channel = support::channel(&server).await;
    let tenants = pb::registry_service_client::RegistryServiceClient::new(channel)
        .list_tenants(authed(pb::ListTenantsRequest::default(), &admin))
        .await
        .unwrap()
        .into_inner()
        .tenants;
    assert!(tenants.is_empty(), "a forged form created {tenants:?}");
    // Signing out ends the session on the server.
    let out = http
        .post(format!("{console}/console/logout"))
        .header("cookie", &session)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[("csrf", csrf.as_str())]))
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), 303);
    let after = http
        .get(format!("{console}/console/"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(after.headers()["location"], "/console/login");
    portal_links_over_the_api(&http, &console, &admin).await;
    server.terminate().await;
    env.finish().await;
}

/// Signs in with `key` as a browser would, checking the login form's CSRF token and the
/// session cookie's flags; returns the `hookline_console=…` cookie pair.
async fn sign_in_over_http(http: &reqwest::Client, console: &str, admin: &str) -> String {
    let page = http
        .get(format!("{console}/console/login"))
        .send()
        .await
        .unwrap();
    let login_cookie = cookie(&page, "hookline_console_login");
    assert!(
        page.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("frame-ancestors 'none'")
    );
    let body = page.text().await.unwrap();
    let token = hidden_csrf(&body);
    // Without the login form's token: refused.
    let refused = http
        .post(format!("{console}/console/login"))
        .header("cookie", format!("hookline_console_login={login_cookie}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[("csrf", "forged"), ("api_key", admin)]))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    let ok = http
        .post(format!("{console}/console/login"))
        .header("cookie", format!("hookline_console_login={login_cookie}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[("csrf", token.as_str()), ("api_key", admin)]))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 303);
    let set = ok
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect::<Vec<_>>();
    let session_line = set
        .iter()
        .find(|c| c.starts_with("hookline_console="))
        .expect("a session cookie");
    for flag in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/console"] {
        assert!(session_line.contains(flag), "{session_line} lacks {flag}");
    }
    session_line.split(';').next().unwrap().to_string()
}

/// `POST /console/api/portal-links`: a key is required, a forged link is refused.
async fn portal_links_over_the_api(http: &reqwest::Client, console: &str, admin: &str) {
    let api = format!("{console}/console/api/portal-links");
    let anonymous = http
        .post(&api)
        .header("content-type", "application/json")
        .body(serde_json::json!({"tenant_id": "x"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let missing = http
        .post(&api)
        .bearer_auth(admin)
        .header("content-type", "application/json")
        .body(
            serde_json::json!({"tenant_id": "ten_01JAAAAAAAAAAAAAAAAAAAAAAA", "ttl_secs": 60})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert!(missing.status().is_client_error(), "{}", missing.status());
    let forged = http
        .get(format!(
            "{console}/console/portal?token=v1.ten_01JAAAAAAAAAAAAAAAAAAAAAAA.99999999999.AAAA"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403);
    assert!(
        forged
            .text()
            .await
            .unwrap()
            .contains("signature does not match")
    );
}

fn cookie(res: &reqwest::Response, name: &str) -> String {
    res.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|c| c.strip_prefix(&format!("{name}=")))
        .and_then(|c| c.split(';').next())
        .expect("the cookie")
        .to_string()
}

fn hidden_csrf(page: &str) -> String {
    page.split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a CSRF field")
        .to_string()
}

/// An `application/x-www-form-urlencoded` body (values here need no escaping but `"`).
fn form(fields: &[(&str, &str)]) -> String {
    fields
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}
