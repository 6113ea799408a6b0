//! Which requests count as coming from this host, for what a loopback
//! listener serves without credentials (the API with no keys, client ids
//! chosen by clients).
//!
//! A loopback listener alone does not make a request local: a reverse proxy
//! on the same host (the usual way to terminate TLS) relays the whole
//! network's requests over loopback, and a web page whose name was rebound to
//! 127.0.0.1 (DNS rebinding), or any web page at all, reaches it from the
//! user's browser. So a request that carries a proxy's forwarding headers,
//! names another host in `Host`, or comes from a page of another site
//! (`Origin`, which browsers send with every WebSocket handshake) is not
//! local. A proxy that rewrites `Host` to loopback and adds nothing cannot be
//! told from a local client: the docs say to configure credentials behind one.

use axum::http::{HeaderMap, header};

/// Headers that proxies add when they forward a request.
const FORWARDING: [&str; 5] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-real-ip",
    "via",
];

/// `Ok` when `headers` show a request from this host; otherwise why not, to
/// finish a sentence such as "this request ...". With `origin_vetted` (the
/// operator listed the origins allowed, and this one passed), `Origin` is not
/// looked at.
pub fn from_this_host(headers: &HeaderMap, origin_vetted: bool) -> Result<(), String> {
    if let Some(name) = FORWARDING.iter().find(|name| headers.contains_key(**name)) {
        return Err(format!("was forwarded by a proxy (it carries {name})"));
    }
    // HTTP/1.0 has no Host; a browser always sends one.
    if let Some(host) = headers.get(header::HOST) {
        match host.to_str() {
            Ok(host) if names_this_host(host) => {}
            Ok(host) => return Err(format!("names another host ({host:?}) in Host")),
            Err(_) => return Err("has a Host that is not text".into()),
        }
    }
    if origin_vetted {
        return Ok(());
    }
    match headers.get(header::ORIGIN).map(|origin| origin.to_str()) {
        None => Ok(()),
        Some(Ok(origin)) if origin_on_this_host(origin) => Ok(()),
        Some(Ok(origin)) => Err(format!("comes from a page of another site ({origin:?})")),
        Some(Err(_)) => Err("has an Origin that is not text".into()),
    }
}

/// Whether a browser's `Origin` (`scheme://host[:port]`) is a page of this
/// host; `null` (a file, a sandboxed frame) is not.
fn origin_on_this_host(origin: &str) -> bool {
    origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .is_some_and(names_this_host)
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
                from_this_host(&headers(&[("host", host)]), false),
                Ok(()),
                "{host}"
            );
        }
        assert_eq!(from_this_host(&HeaderMap::new(), false), Ok(()));
        for host in [
            "evil.example:4000",
            "example.com",
            "10.0.0.1:4000",
            "[2001:db8::1]:4000",
            "localhost.evil.example",
        ] {
            let refused = from_this_host(&headers(&[("host", host)]), false);
            assert!(refused.is_err(), "{host}");
        }
        for name in FORWARDING {
            let refused =
                from_this_host(&headers(&[("host", "127.0.0.1"), (name, "1.2.3.4")]), true);
            assert!(refused.unwrap_err().contains(name), "{name}");
        }
        for origin in [
            "http://127.0.0.1:4000",
            "http://localhost:3000",
            "https://[::1]",
        ] {
            let local = from_this_host(
                &headers(&[("host", "127.0.0.1:4000"), ("origin", origin)]),
                false,
            );
            assert_eq!(local, Ok(()), "{origin}");
        }
        for origin in ["https://evil.example", "null", "http://10.0.0.1"] {
            let sent = headers(&[("host", "127.0.0.1:4000"), ("origin", origin)]);
            let refused = from_this_host(&sent, false).unwrap_err();
            assert!(refused.contains("another site"), "{origin}");
            assert_eq!(from_this_host(&sent, true), Ok(()), "vetted: {origin}");
        }
    }
}
