//! Which requests count as coming from this host, for what a loopback
//! listener serves without credentials (the API with no keys, client ids
//! chosen by clients).
//!
//! A loopback listener alone does not make a request local: a reverse proxy
//! on the same host (the usual way to terminate TLS) relays the whole
//! network's requests over loopback, and a web page whose name was rebound to
//! 127.0.0.1 (DNS rebinding) reaches it from the user's browser. So a request
//! that carries a proxy's forwarding headers, or names another host in
//! `Host`, is not local.

use axum::http::{HeaderMap, header};

/// Headers that proxies add when they forward a request.
const FORWARDING: [&str; 4] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-real-ip",
];

/// `Ok` when `headers` show a request from this host; otherwise why not, to
/// finish a sentence such as "this request ...".
pub fn from_this_host(headers: &HeaderMap) -> Result<(), String> {
    if let Some(name) = FORWARDING.iter().find(|name| headers.contains_key(**name)) {
        return Err(format!("was forwarded by a proxy (it carries {name})"));
    }
    match headers.get(header::HOST).map(|host| host.to_str()) {
        // HTTP/1.0 has no Host; a browser always sends one.
        None => Ok(()),
        Some(Ok(host)) if names_this_host(host) => Ok(()),
        Some(Ok(host)) => Err(format!("names another host ({host:?}) in Host")),
        Some(Err(_)) => Err("has a Host that is not text".into()),
    }
}

/// Whether a `Host` value (a name or address, with or without a port) names
/// this host: `localhost` (and its subdomains, RFC 6761) or a loopback address.
fn names_this_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| {
                (
                    header::HeaderName::from_static(name),
                    value.parse().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn loopback_names_are_local_and_others_or_forwarded_requests_are_not() {
        for host in [
            "127.0.0.1:4000",
            "127.3.2.1",
            "localhost",
            "LOCALHOST:80",
            "app.localhost:3000",
            "localhost.",
            "[::1]:4000",
            "[::1]",
        ] {
            assert_eq!(
                from_this_host(&headers(&[("host", host)])),
                Ok(()),
                "{host}"
            );
        }
        assert_eq!(from_this_host(&HeaderMap::new()), Ok(()));
        for host in [
            "evil.example:4000",
            "example.com",
            "10.0.0.1:4000",
            "[2001:db8::1]:4000",
            "localhost.evil.example",
        ] {
            let refused = from_this_host(&headers(&[("host", host)]));
            assert!(refused.is_err(), "{host}");
        }
        for name in FORWARDING {
            let refused = from_this_host(&headers(&[("host", "127.0.0.1"), (name, "1.2.3.4")]));
            assert!(refused.unwrap_err().contains(name), "{name}");
        }
    }
}
