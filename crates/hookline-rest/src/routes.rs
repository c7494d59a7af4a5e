//! The HTTP routes of the API, read from the `google.api.http` option of each method in
//! the descriptors: the `.proto` files are the one place a route is written down.

use http::Method;
use prost_reflect::{DescriptorPool, MethodDescriptor, Value};

/// The extension that carries a method's HTTP rule.
const HTTP_EXTENSION: &str = "google.api.http";

/// One segment of a path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Literal(String),
    /// A `{field.path}` variable: one path segment into a (possibly nested) string field.
    Field(String),
}

/// One method reachable over HTTP.
#[derive(Debug, Clone)]
pub struct Route {
    pub method: Method,
    /// The template as written, e.g. `/v1/tenants/{tenant_id}/events`.
    pub template: String,
    pub segments: Vec<Segment>,
    /// A custom verb after the last segment (`:retry`), if any.
    pub verb: Option<String>,
    /// `*` when the whole request message is the body; empty when there is none.
    pub body: String,
    pub rpc: MethodDescriptor,
}

/// A matched route and the values of its path variables.
pub struct Matched<'a> {
    pub route: &'a Route,
    pub vars: Vec<(String, String)>,
}

/// Every route of the unary and server-streaming methods in `pool` that carry an HTTP rule.
pub fn from_pool(pool: &DescriptorPool) -> Vec<Route> {
    let Some(ext) = pool.get_extension_by_name(HTTP_EXTENSION) else {
        return Vec::new();
    };
    let mut routes = Vec::new();
    for service in pool.services() {
        for rpc in service.methods() {
            if rpc.is_client_streaming() {
                continue;
            }
            let options = rpc.options();
            if !options.has_extension(&ext) {
                continue;
            }
            if let Value::Message(rule) = options.get_extension(&ext).as_ref()
                && let Some(route) = route_of(rule, rpc.clone())
            {
                routes.push(route);
            }
        }
    }
    routes
}

fn route_of(rule: &prost_reflect::DynamicMessage, rpc: MethodDescriptor) -> Option<Route> {
    let text = |name: &str| {
        rule.get_field_by_name(name)
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    };
    let (method, template) = [
        (Method::GET, "get"),
        (Method::PUT, "put"),
        (Method::POST, "post"),
        (Method::DELETE, "delete"),
        (Method::PATCH, "patch"),
    ]
    .into_iter()
    .map(|(m, name)| (m, text(name)))
    .find(|(_, t)| !t.is_empty())?;
    let (path, verb) = split_verb(&template);
    let segments = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(
            |s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(var) => Segment::Field(var.split('=').next().unwrap_or(var).to_string()),
                None => Segment::Literal(s.to_string()),
            },
        )
        .collect();
    Some(Route {
        method,
        template: template.clone(),
        segments,
        verb: verb.map(str::to_string),
        body: text("body"),
        rpc,
    })
}

/// Splits `/a/{b}:verb` into `/a/{b}` and `verb`.
fn split_verb(path: &str) -> (&str, Option<&str>) {
    let last = path.rsplit('/').next().unwrap_or_default();
    match last.rfind(':') {
        Some(i) if !last[i..].contains('}') => {
            let at = path.len() - last.len() + i;
            (&path[..at], Some(&path[at + 1..]))
        }
        _ => (path, None),
    }
}

/// The route for `method` and `path`; `Err(true)` when the path exists under another
/// method (405), `Err(false)` when it does not exist at all (404).
pub fn find<'a>(routes: &'a [Route], method: &Method, path: &str) -> Result<Matched<'a>, bool> {
    let (path, verb) = split_verb(path);
    let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let mut other_method = false;
    for route in routes {
        if route.verb.as_deref() != verb || route.segments.len() != parts.len() {
            continue;
        }
        let Some(vars) = match_segments(&route.segments, &parts) else {
            continue;
        };
        if route.method == *method {
            return Ok(Matched { route, vars });
        }
        other_method = true;
    }
    Err(other_method)
}

fn match_segments(segments: &[Segment], parts: &[&str]) -> Option<Vec<(String, String)>> {
    let mut vars = Vec::new();
    for (segment, part) in segments.iter().zip(parts) {
        match segment {
            Segment::Literal(l) if l == part => {}
            Segment::Literal(_) => return None,
            Segment::Field(f) => vars.push((f.clone(), percent_decode(part)?)),
        }
    }
    Some(vars)
}

/// `%xx`-decodes one path segment; `None` when it is not valid UTF-8 afterwards.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_custom_verbs_but_not_variables() {
        assert_eq!(
            split_verb("/v1/d/{id}:retry"),
            ("/v1/d/{id}", Some("retry"))
        );
        assert_eq!(split_verb("/v1/d/{id}"), ("/v1/d/{id}", None));
        assert_eq!(
            split_verb("/v1/events:batchPublish"),
            ("/v1/events", Some("batchPublish"))
        );
    }

    #[test]
    fn every_method_has_a_route() {
        let pool = DescriptorPool::decode(hookline_proto::FILE_DESCRIPTOR_SET).unwrap();
        let routes = from_pool(&pool);
        let methods = pool.services().map(|s| s.methods().len()).sum::<usize>();
        assert_eq!(routes.len(), methods);
        let m = find(&routes, &Method::POST, "/v1/deliveries/dl_1%20x:retry")
            .ok()
            .unwrap();
        assert_eq!(m.route.rpc.name(), "RetryDelivery");
        assert_eq!(m.vars, vec![("delivery_id".into(), "dl_1 x".into())]);
        assert!(matches!(
            find(&routes, &Method::PUT, "/v1/tenants"),
            Err(true)
        ));
        assert!(matches!(
            find(&routes, &Method::GET, "/v1/nothing"),
            Err(false)
        ));
    }
}
