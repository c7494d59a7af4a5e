//! Which IP addresses may be reached: the built-in refused ranges, and the operator's
//! `egress_allow` and `egress_deny` lists on top of them.
//!
//! Order of the rules: `egress_deny` refuses, then `egress_allow` allows, then an IPv6
//! address that carries an IPv4 address (IPv4-mapped, IPv4-compatible, NAT64, 6to4) is
//! judged as that IPv4 address, then the built-in table refuses, and any IPv6 address
//! outside global unicast (`2000::/3`) is refused. Everything else is allowed.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::LazyLock;

use ipnet::IpNet;
use thiserror::Error;

/// The ranges refused by default, with what they are, most specific first where they
/// overlap.
const REFUSED: &[(&str, &str)] = &[
    ("0.0.0.0/32", "the unspecified address"),
    ("0.0.0.0/8", "a \"this network\" address"),
    ("10.0.0.0/8", "a private address (RFC 1918)"),
    (
        "100.64.0.0/10",
        "a shared address (RFC 6598, carrier-grade NAT)",
    ),
    ("127.0.0.0/8", "a loopback address"),
    ("169.254.0.0/16", "a link-local address"),
    ("172.16.0.0/12", "a private address (RFC 1918)"),
    ("192.0.0.0/24", "an IETF protocol assignment address"),
    ("192.0.2.0/24", "a documentation address"),
    ("192.88.99.0/24", "a reserved address (6to4 relay anycast)"),
    ("192.168.0.0/16", "a private address (RFC 1918)"),
    ("198.18.0.0/15", "a benchmarking address"),
    ("198.51.100.0/24", "a documentation address"),
    ("203.0.113.0/24", "a documentation address"),
    ("224.0.0.0/4", "a multicast address"),
    ("255.255.255.255/32", "the broadcast address"),
    ("240.0.0.0/4", "a reserved address"),
    ("::/128", "the unspecified address"),
    ("::1/128", "a loopback address"),
    ("64:ff9b:1::/48", "a local-use NAT64 address"),
    ("100::/64", "a discard-only address"),
    ("2001:2::/48", "a benchmarking address"),
    ("2001::/23", "an IETF protocol assignment address"),
    ("2001:db8::/32", "a documentation address"),
    ("3fff::/20", "a documentation address"),
    ("fc00::/7", "a unique local address"),
    ("fe80::/10", "a link-local address"),
    ("fec0::/10", "a site-local address"),
    ("ff00::/8", "a multicast address"),
];

/// A table of ranges, parsed.
fn nets(table: &[(&str, &'static str)]) -> Vec<(IpNet, &'static str)> {
    table
        .iter()
        .map(|(net, what)| (net.parse().expect("a built-in range"), *what))
        .collect()
}

static REFUSED_NETS: LazyLock<Vec<(IpNet, &'static str)>> = LazyLock::new(|| nets(REFUSED));

static GLOBAL_UNICAST_V6: LazyLock<IpNet> =
    LazyLock::new(|| "2000::/3".parse().expect("a built-in range"));

/// IPv6 forms that carry an IPv4 address, with the prefix that marks them.
const EMBEDDING: &[(&str, &str)] = &[
    ("::ffff:0:0/96", "IPv4-mapped"),
    ("::/96", "IPv4-compatible"),
    ("64:ff9b::/96", "NAT64"),
];

static EMBEDDING_NETS: LazyLock<Vec<(IpNet, &'static str)>> = LazyLock::new(|| nets(EMBEDDING));

static SIX_TO_FOUR: LazyLock<IpNet> =
    LazyLock::new(|| "2002::/16".parse().expect("a built-in range"));

/// A range in a setting that is not an address or CIDR block.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("{0:?} is not an IP address or CIDR range (like 10.0.0.0/8, 127.0.0.1 or fd00::/8)")]
pub struct ParseRangeError(pub String);

/// Parses `10.0.0.0/8`, `127.0.0.1` (one address) or `fd00::/8`; host bits are dropped.
pub fn parse_range(text: &str) -> Result<IpNet, ParseRangeError> {
    let text = text.trim();
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    text.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| ParseRangeError(text.to_string()))
}

/// Which addresses may be reached. `Default` refuses every range that is not globally
/// routable unicast.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

/// Why an address is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The address as it was found (in the URL or in the DNS answer).
    pub address: IpAddr,
    /// When `address` is an IPv6 form of an IPv4 address: the form and that address.
    pub embedded: Option<(&'static str, Ipv4Addr)>,
    /// What kind of address it is ("a loopback address").
    pub class: &'static str,
    /// The refused range it falls in.
    pub range: IpNet,
    /// Whether `egress_deny` refused it (otherwise the built-in ranges did).
    pub denied: bool,
}

impl Refusal {
    /// What would allow the address: the setting, with the address itself as example.
    pub fn advice(&self) -> String {
        let exact = match self.embedded {
            Some((_, v4)) => IpNet::from(IpAddr::V4(v4)),
            None => IpNet::from(self.address),
        };
        self.advice_for(exact)
    }

    /// What would allow the address, with `example` as the value of the setting.
    pub fn advice_for(&self, example: IpNet) -> String {
        if self.denied {
            return format!(
                "it is in egress_deny ({}); remove that range from egress_deny to allow it",
                self.range
            );
        }
        format!(
            "Hookline delivers only to globally routable addresses unless the operator allows \
             more: egress_allow (e.g. HOOKLINE_EGRESS_ALLOW={example}) would allow it"
        )
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.embedded {
            Some((form, v4)) => write!(
                f,
                "{} is the {form} form of {v4}, {} ({})",
                self.address, self.class, self.range
            ),
            None => write!(f, "{} is {} ({})", self.address, self.class, self.range),
        }
    }
}

impl EgressPolicy {
    /// The built-in rules with `allow` opened and `deny` refused on top (`deny` wins).
    pub fn new(allow: Vec<IpNet>, deny: Vec<IpNet>) -> Self {
        Self { allow, deny }
    }

    /// The ranges opened by `egress_allow`.
    pub fn allowed(&self) -> &[IpNet] {
        &self.allow
    }

    /// Whether `address` may be connected to.
    pub fn check(&self, address: IpAddr) -> Result<(), Refusal> {
        if let Some(range) = self.deny.iter().find(|n| n.contains(&address)) {
            return Err(Refusal {
                address,
                embedded: None,
                class: "an address in egress_deny",
                range: *range,
                denied: true,
            });
        }
        if self.allow.iter().any(|n| n.contains(&address)) {
            return Ok(());
        }
        if let IpAddr::V6(v6) = address
            && let Some((form, v4)) = embedded_v4(v6)
        {
            return self.check(IpAddr::V4(v4)).map_err(|inner| Refusal {
                address,
                embedded: Some((form, v4)),
                ..inner
            });
        }
        if let Some((range, class)) = REFUSED_NETS.iter().find(|(n, _)| n.contains(&address)) {
            return Err(Refusal {
                address,
                embedded: None,
                class,
                range: *range,
                denied: false,
            });
        }
        if address.is_ipv6() && !GLOBAL_UNICAST_V6.contains(&address) {
            return Err(Refusal {
                address,
                embedded: None,
                class: "outside global unicast (a reserved address)",
                range: *GLOBAL_UNICAST_V6,
                denied: false,
            });
        }
        Ok(())
    }
}

/// The IPv4 address an IPv6 address carries, and the form it is carried in. `::` and
/// `::1` are IPv6 addresses of their own, not IPv4-compatible forms.
fn embedded_v4(v6: Ipv6Addr) -> Option<(&'static str, Ipv4Addr)> {
    if v6.is_unspecified() || v6.is_loopback() {
        return None;
    }
    let address = IpAddr::V6(v6);
    let o = v6.octets();
    if let Some((_, form)) = EMBEDDING_NETS.iter().find(|(n, _)| n.contains(&address)) {
        return Some((form, Ipv4Addr::new(o[12], o[13], o[14], o[15])));
    }
    if SIX_TO_FOUR.contains(&address) {
        return Some(("6to4", Ipv4Addr::new(o[2], o[3], o[4], o[5])));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(policy: &EgressPolicy, address: &str) -> Refusal {
        policy
            .check(address.parse().unwrap())
            .expect_err(&format!("{address} should be refused"))
    }

    #[test]
    fn the_default_refuses_every_special_range() {
        let p = EgressPolicy::default();
        for (address, class) in [
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "this network"),
            ("10.1.2.3", "private"),
            ("172.20.0.1", "private"),
            ("192.168.1.1", "private"),
            ("100.64.0.1", "shared"),
            ("169.254.169.254", "link-local"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("192.0.2.10", "documentation"),
            ("198.51.100.1", "documentation"),
            ("203.0.113.5", "documentation"),
            ("198.18.0.1", "benchmarking"),
            ("240.0.0.1", "reserved"),
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("fe80::1", "link-local"),
            ("fc00::1", "unique local"),
            ("fd12:3456::1", "unique local"),
            ("ff02::1", "multicast"),
            ("2001:db8::1", "documentation"),
            ("2001:2::1", "benchmarking"),
        ] {
            let r = refused(&p, address);
            assert!(r.class.contains(class), "{address}: {r}");
            assert!(!r.denied);
        }
    }

    #[test]
    fn ipv6_forms_of_refused_ipv4_addresses_are_refused() {
        let p = EgressPolicy::default();
        for (address, form, v4) in [
            ("::ffff:127.0.0.1", "IPv4-mapped", "127.0.0.1"),
            ("::ffff:169.254.169.254", "IPv4-mapped", "169.254.169.254"),
            ("::127.0.0.1", "IPv4-compatible", "127.0.0.1"),
            ("::10.0.0.1", "IPv4-compatible", "10.0.0.1"),
            ("64:ff9b::7f00:1", "NAT64", "127.0.0.1"),
            ("64:ff9b::c0a8:101", "NAT64", "192.168.1.1"),
            ("2002:7f00:1::1", "6to4", "127.0.0.1"),
            ("2002:a9fe:a9fe::", "6to4", "169.254.169.254"),
        ] {
            let r = refused(&p, address);
            assert_eq!(r.embedded, Some((form, v4.parse().unwrap())), "{address}");
            let text = r.to_string();
            assert!(text.contains(form) && text.contains(v4), "{text}");
        }
        // The same forms of a global address are fine.
        for address in ["::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"] {
            assert!(p.check(address.parse().unwrap()).is_ok(), "{address}");
        }
    }

    #[test]
    fn global_unicast_is_allowed_and_the_rest_of_ipv6_is_not() {
        let p = EgressPolicy::default();
        for address in ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700::1111"] {
            assert!(p.check(address.parse().unwrap()).is_ok(), "{address}");
        }
        assert!(refused(&p, "4000::1").class.contains("global unicast"));
    }

    #[test]
    fn allow_opens_a_range_and_deny_wins() {
        let p = EgressPolicy::new(
            vec![
                parse_range("127.0.0.1").unwrap(),
                parse_range("10.0.0.0/8").unwrap(),
            ],
            vec![
                parse_range("10.9.0.0/16").unwrap(),
                parse_range("8.8.8.8").unwrap(),
            ],
        );
        assert!(p.check("127.0.0.1".parse().unwrap()).is_ok());
        assert!(p.check("::ffff:127.0.0.1".parse().unwrap()).is_ok());
        assert!(p.check("10.1.2.3".parse().unwrap()).is_ok());
        assert!(p.check("127.0.0.2".parse().unwrap()).is_err());
        let r = refused(&p, "10.9.1.1");
        assert!(r.denied && r.advice().contains("egress_deny"), "{r}");
        assert!(refused(&p, "8.8.8.8").denied);
    }

    #[test]
    fn advice_names_the_setting_and_the_address() {
        let r = refused(&EgressPolicy::default(), "127.0.0.1");
        assert!(
            r.advice().contains("HOOKLINE_EGRESS_ALLOW=127.0.0.1/32"),
            "{}",
            r.advice()
        );
        let r = refused(&EgressPolicy::default(), "::ffff:127.0.0.1");
        assert!(
            r.advice().contains("HOOKLINE_EGRESS_ALLOW=127.0.0.1/32"),
            "{}",
            r.advice()
        );
        let r = refused(&EgressPolicy::default(), "::1");
        assert!(
            r.advice().contains("HOOKLINE_EGRESS_ALLOW=::1/128"),
            "{}",
            r.advice()
        );
    }

    #[test]
    fn ranges_parse_with_and_without_a_prefix() {
        assert_eq!(
            parse_range(" 10.1.2.3/8").unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            parse_range("127.0.0.1").unwrap().to_string(),
            "127.0.0.1/32"
        );
        assert_eq!(parse_range("::1").unwrap().to_string(), "::1/128");
        assert!(parse_range("localhost").is_err());
        assert!(parse_range("10.0.0.0/33").is_err());
    }
}
