//! The opening handshake, as little of HTTP/1.1 as the bench's clients use.

use switchboard_proto::handshake::accept_key;

/// Largest request head read.
pub const MAX_HEAD: usize = 8 * 1024;

/// What a connection asked for.
pub enum Route {
    /// `/ws?id=ID`, with `switchboard.v1` if it offered it.
    Relay { id: Box<str>, v1: bool },
    /// `/echo`: every message comes back.
    Echo,
}

/// Reads a request head (without its final blank line) and returns the route
/// and the 101 response, or `None` for anything else (the caller closes).
pub fn answer(head: &[u8]) -> Option<(Route, Vec<u8>)> {
    let head = std::str::from_utf8(head).ok()?;
    let mut lines = head.split("\r\n");
    let target = lines.next()?.strip_prefix("GET ")?.split(' ').next()?;
    let (mut key, mut v1) = (None, false);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.eq_ignore_ascii_case("sec-websocket-key") {
            key = Some(value.trim());
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            v1 = value.split(',').any(|p| p.trim() == "switchboard.v1");
        }
    }
    let route = match target.split_once('?') {
        None if target == "/echo" => Route::Echo,
        Some(("/ws", query)) => {
            let id = query.split('&').find_map(|pair| pair.strip_prefix("id="))?;
            Route::Relay { id: id.into(), v1 }
        }
        _ => return None,
    };
    let protocol = match route {
        Route::Relay { v1: true, .. } => "Sec-WebSocket-Protocol: switchboard.v1\r\n",
        _ => "",
    };
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n{protocol}\r\n",
        accept_key(key?.as_bytes())
    );
    Some((route, response.into_bytes()))
}
