//! JSON Schemas of event types: checked when an admin sets one, enforced on publish.
//!
//! A schema is compiled once ([`PayloadSchema::compile`]) and then checks any number of
//! payloads. References are resolved only inside the schema itself: `jsonschema` is built
//! without its HTTP and file resolvers, so a schema can never make Hookline fetch anything.

use crate::validate::ValidationError;

/// Most bytes of a schema error repeated to the caller.
const MAX_ERROR_CHARS: usize = 300;

/// A compiled JSON Schema.
pub struct PayloadSchema {
    validator: jsonschema::Validator,
}

impl std::fmt::Debug for PayloadSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PayloadSchema(..)")
    }
}

impl PayloadSchema {
    /// Compiles schema text; `field` names it in the error (`schema`).
    pub fn compile(field: &str, text: &str) -> Result<Self, ValidationError> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| ValidationError::new(field, format!("is not valid JSON: {e}")))?;
        let validator = jsonschema::validator_for(&value).map_err(|e| {
            ValidationError::new(
                field,
                format!("is not a usable JSON Schema: {}", bounded(&e.to_string())),
            )
        })?;
        Ok(Self { validator })
    }

    /// Checks a payload (already known to be JSON within the input limits) against the
    /// schema of `event_type`; the error names the first violation and its JSON pointer.
    pub fn check(
        &self,
        field: &str,
        event_type: &str,
        payload: &[u8],
    ) -> Result<(), ValidationError> {
        let value: serde_json::Value = serde_json::from_slice(payload)
            .map_err(|e| ValidationError::new(field, format!("is not valid JSON: {e}")))?;
        let Some(error) = self.validator.iter_errors(&value).next() else {
            return Ok(());
        };
        let pointer = error.instance_path.to_string();
        Err(ValidationError::new(
            field,
            format!(
                "does not match the schema of event type {event_type:?} at JSON pointer {:?}: {}",
                if pointer.is_empty() {
                    ""
                } else {
                    pointer.as_str()
                },
                bounded(&error.to_string())
            ),
        ))
    }
}

fn bounded(text: &str) -> String {
    match text.char_indices().nth(MAX_ERROR_CHARS) {
        None => text.to_string(),
        Some((cut, _)) => format!("{}…", &text[..cut]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &str = r#"{"type":"object","required":["amount"],
        "properties":{"amount":{"type":"integer","minimum":0},
                      "items":{"type":"array","items":{"type":"string"}}}}"#;

    #[test]
    fn payloads_are_checked_with_a_pointer() {
        let s = PayloadSchema::compile("schema", SCHEMA).unwrap();
        assert!(
            s.check("payload", "invoice.paid", br#"{"amount":5}"#)
                .is_ok()
        );
        let e = s
            .check(
                "payload",
                "invoice.paid",
                br#"{"amount":5,"items":["a",7]}"#,
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"/items/1\""), "{e}");
        assert!(e.contains("invoice.paid"), "{e}");
        let e = s
            .check("payload", "invoice.paid", br#"{"amount":-1}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"/amount\""), "{e}");
        assert!(s.check("payload", "invoice.paid", b"{}").is_err());
    }

    #[test]
    fn unusable_schemas_and_remote_references_are_refused() {
        assert!(PayloadSchema::compile("schema", "{nope").is_err());
        assert!(PayloadSchema::compile("schema", r#"{"type":"no-such-type"}"#).is_err());
        let remote = r#"{"$ref":"http://169.254.169.254/latest/meta-data"}"#;
        let e = PayloadSchema::compile("schema", remote)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a usable JSON Schema"), "{e}");
    }
}
