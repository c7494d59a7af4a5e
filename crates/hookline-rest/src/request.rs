//! An HTTP request as the gRPC request message: path variables, query parameters and the
//! JSON body are gathered into one proto3-JSON object and parsed by the descriptor, so
//! every field is checked by the same rules as any JSON client's.

use prost_reflect::{DynamicMessage, Kind, MessageDescriptor};
use serde_json::{Map, Value};

use crate::error::RestError;
use crate::routes::Matched;

/// The request message of `matched` from its query string and body.
pub fn build(
    matched: &Matched<'_>,
    query: Option<&str>,
    body: &[u8],
) -> Result<DynamicMessage, RestError> {
    let desc = matched.route.rpc.input();
    let mut object = if matched.route.body == "*" && !body.iter().all(u8::is_ascii_whitespace) {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(map)) => map,
            Ok(_) => return Err(RestError::bad_body("the body must be a JSON object")),
            Err(e) => return Err(RestError::bad_body(format!("the body is not JSON: {e}"))),
        }
    } else {
        Map::new()
    };
    if matched.route.body != "*" {
        for (key, value) in parse_query(query.unwrap_or_default())? {
            let field = key.clone();
            let value = query_value(&desc, &key, value)?;
            check_alone(&desc, &key, &value)?;
            insert(&mut object, &key, value, true)
                .map_err(|_| RestError::field(&field, "is given twice"))?;
        }
    } else if query.is_some_and(|q| !q.is_empty()) {
        return Err(RestError::bad_body(
            "this method takes its fields in the JSON body, not in the query string",
        ));
    }
    for (path, value) in &matched.vars {
        insert(&mut object, path, Value::String(value.clone()), false).map_err(|_| {
            RestError::field(
                path,
                "is set in the path; leave it out of the body or give the same value",
            )
        })?;
    }
    DynamicMessage::deserialize(desc, Value::Object(object)).map_err(|e| {
        RestError::bad_body(format!(
            "the request does not fit {}: {e}",
            matched.route.rpc.input().name()
        ))
    })
}

/// Parses one query parameter on its own, so that an error names its field.
fn check_alone(desc: &MessageDescriptor, path: &str, value: &Value) -> Result<(), RestError> {
    let mut alone = Map::new();
    let _ = insert(&mut alone, path, value.clone(), false);
    DynamicMessage::deserialize(desc.clone(), Value::Object(alone))
        .map(drop)
        .map_err(|e| RestError::field(path, e))
}

/// Sets `path` (`a.b.c`) in `object`; `Err` when a different value is already there.
fn insert(
    object: &mut Map<String, Value>,
    path: &str,
    value: Value,
    repeat: bool,
) -> Result<(), ()> {
    let (head, rest) = match path.split_once('.') {
        Some((h, r)) => (h, Some(r)),
        None => (path, None),
    };
    match rest {
        Some(rest) => match object
            .entry(head)
            .or_insert_with(|| Value::Object(Map::new()))
        {
            Value::Object(inner) => insert(inner, rest, value, repeat),
            _ => Err(()),
        },
        None => match object.get_mut(head) {
            None => {
                object.insert(head.to_string(), value);
                Ok(())
            }
            Some(Value::Array(items)) if repeat => {
                if let Value::Array(more) = value {
                    items.extend(more);
                }
                Ok(())
            }
            Some(existing) if *existing == value => Ok(()),
            Some(_) => Err(()),
        },
    }
}

/// Most query parameters one request may carry.
const MAX_QUERY_PARAMS: usize = 64;

fn parse_query(query: &str) -> Result<Vec<(String, String)>, RestError> {
    let mut out = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        if out.len() == MAX_QUERY_PARAMS {
            return Err(RestError::bad_body(format!(
                "more than {MAX_QUERY_PARAMS} query parameters"
            )));
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| {
            crate::routes::percent_decode(&s.replace('+', " "))
                .ok_or_else(|| RestError::bad_body("the query string is not valid UTF-8"))
        };
        out.push((decode(k)?, decode(v)?));
    }
    Ok(out)
}

/// The JSON form of one query value for the field at `path` (`true` for a bool, an
/// array for a repeated field, a string for everything else: proto3 JSON reads numbers,
/// enums, timestamps and durations from strings).
fn query_value(desc: &MessageDescriptor, path: &str, raw: String) -> Result<Value, RestError> {
    let mut message = desc.clone();
    let mut field = None;
    for (i, name) in path.split('.').enumerate() {
        let found = message
            .get_field_by_name(name)
            .or_else(|| message.get_field_by_json_name(name))
            .ok_or_else(|| {
                RestError::field(path, format!("is not a field of {}", message.name()))
            })?;
        if i + 1 < path.split('.').count() {
            match found.kind() {
                Kind::Message(m) if !found.is_list() && !found.is_map() => message = m,
                _ => {
                    return Err(RestError::field(
                        path,
                        "cannot be set from the query string",
                    ));
                }
            }
        }
        field = Some(found);
    }
    let Some(field) = field else {
        return Err(RestError::field(path, "is empty"));
    };
    if field.is_map() {
        return Err(RestError::field(
            path,
            "is a map; it cannot be set from the query string",
        ));
    }
    let scalar = match field.kind() {
        Kind::Bool => match raw.as_str() {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => return Err(RestError::field(path, "must be true or false")),
        },
        Kind::Message(m) if !is_string_wrapped(&m) => {
            return Err(RestError::field(
                path,
                "is a message; set its fields as name.field",
            ));
        }
        _ => Value::String(raw),
    };
    Ok(if field.is_list() {
        Value::Array(vec![scalar])
    } else {
        scalar
    })
}

/// Well-known messages whose proto3 JSON form is a string.
fn is_string_wrapped(m: &MessageDescriptor) -> bool {
    matches!(
        m.full_name(),
        "google.protobuf.Timestamp" | "google.protobuf.Duration" | "google.protobuf.FieldMask"
    )
}
