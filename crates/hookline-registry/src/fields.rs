//! What callers give the registry besides subscription fields, checked: signing secrets
//! and event-type schemas. The rules live in `hookline_core` (`validate`, `schema`).

use hookline_core::schema::PayloadSchema;
use hookline_core::signing::{SignatureScheme, generate_secret_for};
use hookline_core::validate;
use hookline_grpc::status::from_validation;
use tonic::Status;

/// Checks a secret given by the caller for a subscription signing with `scheme`, or makes
/// a new one of that scheme.
pub(crate) fn secret_or_generate(
    field: &str,
    given: &str,
    scheme: SignatureScheme,
) -> Result<String, Status> {
    if given.is_empty() {
        return Ok(generate_secret_for(scheme));
    }
    validate::given_secret(field, given, scheme).map_err(from_validation)?;
    Ok(given.to_string())
}

/// An optional JSON Schema given as text: empty means none; otherwise it must compile,
/// since every publish of the event type will be checked against it.
pub(crate) fn schema_text(schema: &str) -> Result<Option<&str>, Status> {
    if schema.is_empty() {
        return Ok(None);
    }
    PayloadSchema::compile("schema", schema).map_err(from_validation)?;
    Ok(Some(schema))
}
