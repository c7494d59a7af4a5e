//! Server addresses as people write them: `host:port` (the form `hookline serve`
//! prints) or a URL. One rule, used by the builder and by the CLI's `--server`.

use crate::Error;

/// The URL tonic connects to for `server`: `host:port` gains `http://`; `http://…` and
/// `https://…` (TLS) are kept.
pub fn normalize(server: &str) -> Result<String, Error> {
    let invalid = |reason: &str| Error::InvalidEndpoint {
        server: server.to_string(),
        reason: reason.to_string(),
    };
    let server = server.trim();
    if server.is_empty() {
        return Err(invalid(
            "it is empty; expected host:port or http://host:port",
        ));
    }
    let url = match server.split_once("://") {
        Some(("http" | "https", rest)) if !rest.is_empty() && !rest.starts_with('/') => {
            server.to_string()
        }
        None if server.contains(':') && !server.contains('/') => format!("http://{server}"),
        None | Some(("http" | "https", _)) => {
            return Err(invalid(
                "expected host:port, http://host:port or https://host:port",
            ));
        }
        Some((scheme, _)) => {
            return Err(invalid(&format!(
                "scheme {scheme:?} is not supported; expected host:port, http://host:port or https://host:port"
            )));
        }
    };
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_and_urls() {
        assert_eq!(
            normalize("127.0.0.1:50051").unwrap(),
            "http://127.0.0.1:50051"
        );
        assert_eq!(
            normalize("http://localhost:50051").unwrap(),
            "http://localhost:50051"
        );
        assert_eq!(normalize("[::1]:50051").unwrap(), "http://[::1]:50051");
        assert_eq!(normalize("https://x:443").unwrap(), "https://x:443");
        for bad in ["", "ftp://x:1", "https://", "localhost", "http://"] {
            assert!(normalize(bad).is_err(), "{bad:?} accepted");
        }
    }
}
