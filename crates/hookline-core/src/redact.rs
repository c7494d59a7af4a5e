//! Connection URLs in messages and logs without their passwords. One rule for every URL
//! Hookline prints (PostgreSQL, RabbitMQ): only a password that is there is hidden.

/// `url` with the password of its user info replaced by `***`
/// (`postgres://user:***@host/db`). A URL without a password, or without any user, is
/// returned as it is; so is text that is not a URL.
pub fn url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[scheme_end..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    match authority.rfind('@').map(|at| (at, &authority[..at])) {
        Some((at, userinfo)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!(
                "{}{user}:***{}",
                &url[..scheme_end],
                &url[scheme_end + at..]
            )
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::url;

    #[test]
    fn hides_only_a_password_that_is_there() {
        assert_eq!(
            url("postgres://postgres:s3cret@db:5432/hl"),
            "postgres://postgres:***@db:5432/hl"
        );
        assert_eq!(
            url("postgres://postgres@127.0.0.1:5432/hl"),
            "postgres://postgres@127.0.0.1:5432/hl"
        );
        assert_eq!(
            url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            url("amqp://127.0.0.1:5672/%2f"),
            "amqp://127.0.0.1:5672/%2f"
        );
        assert_eq!(
            url("postgres://u:p@h/db?application_name=a@b"),
            "postgres://u:***@h/db?application_name=a@b"
        );
        assert_eq!(url("not a url"), "not a url");
    }
}
