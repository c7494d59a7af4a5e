//! The OpenAPI 3.1 document of the REST API, made from the same descriptors and HTTP
//! rules the router uses, so it cannot describe a route or field the API does not have.

use prost_reflect::{DescriptorPool, FieldDescriptor, Kind, MessageDescriptor};
use serde_json::{Map, Value, json};

use crate::routes::{Route, Segment};

/// Only this package's messages and enums are described as components.
const PACKAGE: &str = "hookline.v1";

/// The whole document.
pub fn document(pool: &DescriptorPool, routes: &[Route]) -> Value {
    let mut paths = Map::new();
    for route in routes {
        let key = route.template.clone();
        let entry = paths.entry(key).or_insert_with(|| json!({}));
        entry[route.method.as_str().to_ascii_lowercase()] = operation(route);
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Hookline API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "REST/JSON form of the hookline.v1 gRPC API (proto3 JSON mapping). \
                Every call needs `Authorization: Bearer <api key>`. Errors are \
                `{\"error\": {\"code\", \"status\", \"message\", \"field\"}}` with the gRPC code.",
            "license": { "name": "Apache-2.0", "identifier": "Apache-2.0" },
        },
        "security": [{ "bearer": [] }],
        "paths": paths,
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": schemas(pool),
        },
    })
}

fn operation(route: &Route) -> Value {
    let rpc = &route.rpc;
    let input = rpc.input();
    let mut parameters = Vec::new();
    let mut bound = Vec::new();
    for segment in &route.segments {
        if let Segment::Field(name) = segment {
            bound.push(name.clone());
            parameters.push(json!({
                "name": name, "in": "path", "required": true, "schema": { "type": "string" },
            }));
        }
    }
    let mut op = json!({
        "operationId": rpc.name(),
        "tags": [rpc.parent_service().name()],
        "summary": format!("{}.{}", rpc.parent_service().name(), rpc.name()),
        "responses": {
            "200": ok_response(route),
            "default": {
                "description": "An error, with its gRPC code",
                "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } },
            },
        },
    });
    if route.body == "*" {
        op["requestBody"] = json!({
            "required": true,
            "content": { "application/json": { "schema": reference(&input) } },
        });
    } else {
        for field in input
            .fields()
            .filter(|f| !bound.contains(&f.name().to_string()))
        {
            if let Some(schema) = query_schema(&field) {
                parameters.push(json!({ "name": field.name(), "in": "query", "schema": schema }));
            }
        }
    }
    if !parameters.is_empty() {
        op["parameters"] = Value::Array(parameters);
    }
    op
}

/// The answer: one JSON object, or for a server stream one object per line.
fn ok_response(route: &Route) -> Value {
    let output = reference(&route.rpc.output());
    if route.rpc.is_server_streaming() {
        json!({
            "description": "A stream: one JSON object per line; an error ends it with an Error line",
            "content": { "application/x-ndjson": { "schema": output } },
        })
    } else {
        json!({ "description": "OK", "content": { "application/json": { "schema": output } } })
    }
}

/// The schema of a field that can be given in the query string, if it can.
fn query_schema(field: &FieldDescriptor) -> Option<Value> {
    if field.is_map() {
        return None;
    }
    match field.kind() {
        Kind::Message(m) if well_known(&m).is_none() => None,
        _ => Some(field_schema(field)),
    }
}

fn reference(message: &MessageDescriptor) -> Value {
    well_known(message).unwrap_or_else(
        || json!({ "$ref": format!("#/components/schemas/{}", message.full_name()) }),
    )
}

/// The JSON form of the well-known types the API uses.
fn well_known(message: &MessageDescriptor) -> Option<Value> {
    Some(match message.full_name() {
        "google.protobuf.Timestamp" => json!({ "type": "string", "format": "date-time" }),
        "google.protobuf.Duration" => {
            json!({ "type": "string", "pattern": "^-?[0-9]+(\\.[0-9]{1,9})?s$", "examples": ["3600s"] })
        }
        "google.protobuf.FieldMask" => {
            json!({ "type": "string", "description": "Comma-separated field paths." })
        }
        "google.protobuf.Empty" => json!({ "type": "object" }),
        _ => return None,
    })
}

fn schemas(pool: &DescriptorPool) -> Value {
    let mut out = Map::new();
    out.insert(
        "Error".into(),
        json!({
            "type": "object",
            "required": ["error"],
            "properties": { "error": {
                "type": "object",
                "required": ["code", "status", "message"],
                "properties": {
                    "code": { "type": "integer", "description": "The gRPC code number." },
                    "status": { "type": "string", "description": "The gRPC code name, e.g. INVALID_ARGUMENT." },
                    "message": { "type": "string" },
                    "field": { "type": "string", "description": "The request field the error is about." },
                },
            } },
        }),
    );
    for message in pool
        .all_messages()
        .filter(|m| m.package_name() == PACKAGE && !m.is_map_entry())
    {
        let properties: Map<String, Value> = message
            .fields()
            .map(|f| (f.json_name().to_string(), field_schema(&f)))
            .collect();
        out.insert(
            message.full_name().to_string(),
            json!({ "type": "object", "properties": properties }),
        );
    }
    for e in pool.all_enums().filter(|e| e.package_name() == PACKAGE) {
        let names: Vec<String> = e.values().map(|v| v.name().to_string()).collect();
        out.insert(
            e.full_name().to_string(),
            json!({ "type": "string", "enum": names }),
        );
    }
    Value::Object(out)
}

fn field_schema(field: &FieldDescriptor) -> Value {
    if field.is_map() {
        let Kind::Message(entry) = field.kind() else {
            return json!({ "type": "object" });
        };
        let value = entry.map_entry_value_field();
        return json!({ "type": "object", "additionalProperties": kind_schema(&value.kind()) });
    }
    let one = kind_schema(&field.kind());
    if field.is_list() {
        json!({ "type": "array", "items": one })
    } else {
        one
    }
}

fn kind_schema(kind: &Kind) -> Value {
    match kind {
        Kind::Double | Kind::Float => json!({ "type": "number" }),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            json!({ "type": "integer", "format": "int32" })
        }
        Kind::Uint32 | Kind::Fixed32 => {
            json!({ "type": "integer", "format": "int32", "minimum": 0 })
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 | Kind::Uint64 | Kind::Fixed64 => {
            json!({ "type": "string", "format": "int64", "description": "A 64-bit integer as a decimal string." })
        }
        Kind::Bool => json!({ "type": "boolean" }),
        Kind::String => json!({ "type": "string" }),
        Kind::Bytes => json!({ "type": "string", "contentEncoding": "base64" }),
        Kind::Message(m) => reference(m),
        Kind::Enum(e) => json!({ "$ref": format!("#/components/schemas/{}", e.full_name()) }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reference_resolves() {
        let pool = DescriptorPool::decode(hookline_proto::FILE_DESCRIPTOR_SET).unwrap();
        let doc = document(&pool, &crate::routes::from_pool(&pool));
        let text = doc.to_string();
        for part in text.split("\"#/components/schemas/").skip(1) {
            let name = &part[..part.find('"').unwrap()];
            assert!(
                doc["components"]["schemas"].get(name).is_some(),
                "{name} is not defined"
            );
        }
        assert!(doc["paths"]["/v1/tenants/{tenant_id}/events"]["post"].is_object());
    }
}
