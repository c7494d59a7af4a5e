//! The egress settings (`egress_allow`, `egress_deny`, `egress_proxy`) turned into the
//! policy the registry and the dispatcher share, with errors that name the setting.

use anyhow::Context;
use hookline_egress::{EgressPolicy, parse_range};
use serde::{Deserialize, Deserializer};
use url::Url;

/// The egress settings, checked.
pub struct Egress {
    pub policy: EgressPolicy,
    pub proxy: Option<Url>,
}

impl Egress {
    /// Checks the three settings (`egress_allow`, `egress_deny`, `egress_proxy`).
    pub fn from_settings(
        allow: &[String],
        deny: &[String],
        proxy: Option<&str>,
    ) -> anyhow::Result<Self> {
        let parse = |setting: &str, list: &[String]| -> anyhow::Result<Vec<ipnet::IpNet>> {
            list.iter()
                .filter(|s| !s.trim().is_empty())
                .map(|s| parse_range(s).with_context(|| format!("invalid {setting}")))
                .collect()
        };
        let policy = EgressPolicy::new(parse("egress_allow", allow)?, parse("egress_deny", deny)?);
        let proxy = match proxy.map(str::trim) {
            None | Some("") => None,
            Some(raw) => {
                let url = Url::parse(raw).with_context(|| {
                    format!("egress_proxy {raw:?} is not a URL; expected http://host:port")
                })?;
                anyhow::ensure!(
                    matches!(url.scheme(), "http" | "https") && url.host().is_some(),
                    "egress_proxy {raw:?} must be an http:// or https:// URL with a host"
                );
                Some(url)
            }
        };
        Ok(Self { policy, proxy })
    }
}

/// A list setting given as a list (TOML, flags) or as one comma-separated string (the
/// environment: `HOOKLINE_EGRESS_ALLOW=127.0.0.1/32,::1`).
pub fn ranges<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(text) => text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        OneOrMany::Many(list) => list,
    })
}

#[cfg(test)]
// figment::Jail's closures return figment's own (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use crate::config::{CliOverrides, Config};

    #[test]
    fn settings_come_from_the_environment_as_comma_separated_lists() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("HOOKLINE_EGRESS_ALLOW", "127.0.0.1/32, ::1");
            jail.set_env("HOOKLINE_EGRESS_DENY", "10.9.0.0/16");
            jail.set_env("HOOKLINE_EGRESS_PROXY", "http://proxy.internal:4750");
            let config = Config::load(None, &CliOverrides::default()).unwrap();
            assert_eq!(config.egress_allow, ["127.0.0.1/32", "::1"]);
            let egress = config.egress().unwrap();
            assert!(egress.policy.check("127.0.0.1".parse().unwrap()).is_ok());
            assert!(egress.policy.check("10.9.1.1".parse().unwrap()).is_err());
            assert_eq!(egress.proxy.unwrap().port(), Some(4750));
            Ok(())
        });
    }

    #[test]
    fn a_bad_range_names_the_setting() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("HOOKLINE_EGRESS_ALLOW", "localhost");
            let e = Config::load(None, &CliOverrides::default()).unwrap_err();
            assert!(format!("{e:#}").contains("egress_allow"), "{e:#}");
            Ok(())
        });
    }

    #[test]
    fn the_default_allows_no_special_range() {
        let egress = Config::default().egress().unwrap();
        assert!(egress.policy.check("127.0.0.1".parse().unwrap()).is_err());
        assert!(egress.proxy.is_none());
    }
}
