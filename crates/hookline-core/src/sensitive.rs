//! Which custom header values are sensitive, and how they are shown: the one rule the API
//! applies to every subscription it returns (Get, List, Create, Update; gRPC and REST).
//!
//! A header is sensitive when its name is `Authorization`, `Proxy-Authorization` or
//! `Cookie`, or contains `token`, `secret`, `key` or `password` (case-insensitive). Its
//! value is shown as [`MASK`]; an update that sends [`MASK`] back for a header that exists
//! keeps the stored value, so a read-modify-write never stores the mask.

use std::collections::BTreeMap;

/// What a sensitive header value is shown as.
pub const MASK: &str = "********";

const EXACT: [&str; 3] = ["authorization", "proxy-authorization", "cookie"];
const CONTAINS: [&str; 4] = ["token", "secret", "key", "password"];

/// Whether the value of header `name` is hidden from API answers.
pub fn is_sensitive_header(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    EXACT.contains(&name.as_str()) || CONTAINS.iter().any(|part| name.contains(part))
}

/// `headers` as the API shows them: sensitive values replaced by [`MASK`].
pub fn mask_headers(headers: BTreeMap<String, String>) -> BTreeMap<String, String> {
    headers
        .into_iter()
        .map(|(k, v)| {
            let shown = if is_sensitive_header(&k) {
                MASK.to_string()
            } else {
                v
            };
            (k, shown)
        })
        .collect()
}

/// Puts the stored value back wherever `given` carries [`MASK`] for a header `stored`
/// has (names compared case-insensitively, as HTTP does).
pub fn unmask_headers(given: &mut BTreeMap<String, String>, stored: &BTreeMap<String, String>) {
    for (name, value) in given.iter_mut() {
        if value != MASK {
            continue;
        }
        if let Some((_, old)) = stored.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)) {
            value.clone_from(old);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_rule_names_credentials_in_any_case() {
        for name in [
            "Authorization",
            "COOKIE",
            "proxy-authorization",
            "X-Api-Key",
            "x-auth-token",
            "X-Client-Secret",
            "X-PASSWORD",
            "Keycloak-Id",
        ] {
            assert!(is_sensitive_header(name), "{name}");
        }
        for name in [
            "X-Team",
            "Content-Language",
            "X-Tenant",
            "Set-Cookie-Policy",
        ] {
            assert!(!is_sensitive_header(name), "{name}");
        }
    }

    #[test]
    fn masking_hides_only_sensitive_values() {
        let shown = mask_headers(map(&[("Authorization", "Bearer t"), ("X-Team", "billing")]));
        assert_eq!(
            shown,
            map(&[("Authorization", MASK), ("X-Team", "billing")])
        );
    }

    #[test]
    fn sending_the_mask_back_keeps_the_stored_value() {
        let stored = map(&[("Authorization", "Bearer t")]);
        let mut given = map(&[
            ("authorization", MASK),
            ("X-New-Token", MASK),
            ("X-Team", "b"),
        ]);
        unmask_headers(&mut given, &stored);
        assert_eq!(
            given,
            map(&[
                ("authorization", "Bearer t"),
                ("X-New-Token", MASK),
                ("X-Team", "b")
            ])
        );
    }
}
