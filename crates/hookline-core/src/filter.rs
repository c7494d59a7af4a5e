//! Which subscriptions want an event: event-type filters and channels.
//!
//! A filter is an exact event type (`invoice.paid`), a prefix wildcard (`invoice.*`,
//! matching `invoice.paid` and `invoice.payment.failed` but not `invoice`), or `*`.
//! A subscription with no filters wants every type. Channels narrow further: a
//! subscription with channels only gets events that share one of them.

/// Whether one filter accepts `event_type`. Filters are validated on the way in.
pub fn filter_matches(filter: &str, event_type: &str) -> bool {
    if filter == "*" {
        return true;
    }
    match filter.strip_suffix('*') {
        Some(prefix) => event_type.len() > prefix.len() && event_type.starts_with(prefix),
        None => filter == event_type,
    }
}

/// Whether a subscription with these filters and channels wants this event.
pub fn subscription_wants(
    filters: &[String],
    sub_channels: &[String],
    event_type: &str,
    event_channels: &[String],
) -> bool {
    let type_ok = filters.is_empty() || filters.iter().any(|f| filter_matches(f, event_type));
    let channel_ok =
        sub_channels.is_empty() || sub_channels.iter().any(|c| event_channels.contains(c));
    type_ok && channel_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn exact_and_wildcard_filters() {
        assert!(filter_matches("invoice.paid", "invoice.paid"));
        assert!(!filter_matches("invoice.paid", "invoice.paid.late"));
        assert!(filter_matches("invoice.*", "invoice.paid"));
        assert!(filter_matches("invoice.*", "invoice.payment.failed"));
        assert!(!filter_matches("invoice.*", "invoice"));
        assert!(!filter_matches("invoice.*", "invoices.paid"));
        assert!(filter_matches("*", "anything.at.all"));
    }

    #[test]
    fn no_filters_means_everything() {
        assert!(subscription_wants(&[], &[], "user.created", &[]));
        assert!(!subscription_wants(
            &v(&["invoice.*"]),
            &[],
            "user.created",
            &[]
        ));
    }

    #[test]
    fn channels_narrow_the_match() {
        let chans = v(&["eu"]);
        assert!(subscription_wants(&[], &chans, "a.b", &v(&["eu", "us"])));
        assert!(!subscription_wants(&[], &chans, "a.b", &v(&["us"])));
        assert!(!subscription_wants(&[], &chans, "a.b", &[]));
        assert!(subscription_wants(&[], &[], "a.b", &v(&["us"])));
    }
}
