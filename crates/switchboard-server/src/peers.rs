//! Connections per client IP address, so that one address cannot take every
//! connection the server can hold (and the memory each may use), nor the
//! whole receive budget. An IPv6 address counts as its /64: one host is
//! usually given a whole /64, and could otherwise take a fresh allowance from
//! each of its addresses.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};

use axum::Extension;
use axum::extract::ConnectInfo;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use switchboard::ReceiveBudget;

/// How many WebSocket connections each address holds, against a limit, and
/// each address's share of the receive budget.
#[derive(Debug)]
pub struct PeerLimit {
    max: usize,
    /// The budget, and the most of it one address's connections may hold.
    shares: Option<(ReceiveBudget, usize)>,
    peers: Mutex<HashMap<IpAddr, Peer>>,
}

/// One address's connections.
#[derive(Debug)]
struct Peer {
    count: usize,
    share: Option<ReceiveBudget>,
}

/// The address already holds as many connections as it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerFull {
    /// The most connections an address may hold.
    pub max: usize,
}

/// One connection's place in its address's count, given back when dropped.
/// Kept by the connection for as long as it lives: small, since an idle
/// connection's every byte counts.
#[derive(Debug)]
pub struct PeerSlot {
    limit: Arc<PeerLimit>,
    ip: IpAddr,
}

/// A connection let in: its place, and its address's share of the receive
/// budget, for it to hold what it partly receives against.
#[derive(Debug)]
pub struct Admitted {
    /// Its place in its address's count.
    pub slot: PeerSlot,
    /// Its address's share of the receive budget, if there are shares.
    pub share: Option<ReceiveBudget>,
}

impl PeerLimit {
    /// At most `max` connections per address; 0 is no limit. With `shares`
    /// (a budget, and at most how much of it), each address's connections get
    /// a share of the budget (none without a limit: no address is tracked).
    pub fn new(max: usize, shares: Option<(ReceiveBudget, usize)>) -> Arc<Self> {
        Arc::new(Self {
            max,
            shares,
            peers: Mutex::new(HashMap::new()),
        })
    }

    /// A place for one more connection from `ip`: `Ok(None)` when nothing is
    /// limited, [`PeerFull`] when the address has its fill. An IPv4 address
    /// mapped into IPv6 counts as the IPv4 address it is, and an IPv6 one as
    /// its /64.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Option<Admitted>, PeerFull> {
        if self.max == 0 {
            return Ok(None);
        }
        let ip = counted_as(ip);
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let peer = peers.entry(ip).or_insert_with(|| Peer {
            count: 0,
            share: (self.shares.as_ref()).map(|(budget, share)| budget.peer_share(*share)),
        });
        if peer.count >= self.max {
            return Err(PeerFull { max: self.max });
        }
        peer.count += 1;
        let slot = PeerSlot {
            limit: self.clone(),
            ip,
        };
        let share = peer.share.clone();
        Ok(Some(Admitted { slot, share }))
    }

    /// A place for a connection from a request's peer. Under
    /// `switchboard::serve` every request knows its peer; a router served some
    /// other way has no address to limit by, and gets `Ok(None)`.
    pub fn admit_request(
        self: &Arc<Self>,
        peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    ) -> Result<Option<Admitted>, PeerFull> {
        match peer {
            Some(Extension(ConnectInfo(addr))) => self.admit(addr.ip()),
            None => Ok(None),
        }
    }

    /// Connections `ip` holds now.
    pub fn count(&self, ip: IpAddr) -> usize {
        let peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        peers.get(&counted_as(ip)).map_or(0, |peer| peer.count)
    }
}

/// The address `ip` is counted under.
fn counted_as(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        v4 => v4,
    }
}

impl IntoResponse for PeerFull {
    fn into_response(self) -> Response {
        let message = format!(
            "too many connections from this address: at most {}\n",
            self.max
        );
        (StatusCode::TOO_MANY_REQUESTS, message).into_response()
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut peers = self
            .limit
            .peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(peer) = peers.get_mut(&self.ip) {
            peer.count -= 1;
            if peer.count == 0 {
                // No entry per address ever seen: the map stays as large as the
                // set of addresses connected now. (The share goes with its last
                // connection, which held nothing by now but this slot's clone.)
                peers.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_addresses_of_one_ipv6_64_count_together() {
        let limit = PeerLimit::new(2, None);
        let one: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let two: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:ffff".parse().unwrap();
        let _held = [limit.admit(one).unwrap(), limit.admit(two).unwrap()];
        assert!(limit.admit("2001:db8:1:2::77".parse().unwrap()).is_err());
        assert_eq!(limit.count("2001:db8:1:2::1234".parse().unwrap()), 2);
        assert!(
            limit.admit("2001:db8:1:3::1".parse().unwrap()).is_ok(),
            "another /64"
        );
    }

    #[test]
    fn an_ipv4_mapped_ipv6_address_counts_as_the_ipv4_one() {
        let limit = PeerLimit::new(2, None);
        let _held = limit.admit("192.0.2.7".parse().unwrap()).unwrap();
        let _mapped = limit.admit("::ffff:192.0.2.7".parse().unwrap()).unwrap();
        assert_eq!(limit.count("192.0.2.7".parse().unwrap()), 2);
        assert!(limit.admit("::ffff:192.0.2.7".parse().unwrap()).is_err());
        assert!(limit.admit("192.0.2.8".parse().unwrap()).is_ok());
    }

    #[test]
    fn an_address_holds_at_most_max_and_gets_its_places_back() {
        let limit = PeerLimit::new(2, None);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let mapped = IpAddr::V6(Ipv6Addr::from(0xffff_0a00_0001_u128));
        let first = limit.admit(a).unwrap().unwrap();
        let second = limit.admit(mapped).unwrap().unwrap();
        assert!(
            limit.admit(a).is_err(),
            "the mapped address is the same one"
        );
        assert!(limit.admit("10.0.0.2".parse().unwrap()).is_ok());
        drop(first);
        assert_eq!(limit.count(a), 1);
        let third = limit.admit(a).unwrap();
        drop((second, third));
        assert_eq!(limit.count(a), 0);
        assert!(limit.peers.lock().unwrap().get(&a).is_none());
    }

    #[test]
    fn each_address_holds_against_a_share_of_its_own() {
        let budget = ReceiveBudget::new(100, 40);
        let limit = PeerLimit::new(3, Some((budget.clone(), 50)));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let admitted = [a, a, b].map(|ip| limit.admit(ip).unwrap().unwrap());
        let share = |it: &Admitted| it.share.as_ref().map(|s| (s.total(), s.per_connection()));
        assert!(admitted.iter().all(|it| share(it) == Some((50, 40))));
        let unshared = PeerLimit::new(3, None);
        assert!(unshared.admit(a).unwrap().unwrap().share.is_none());
    }

    #[test]
    fn zero_is_no_limit() {
        let limit = PeerLimit::new(0, None);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        assert!((0..10_000).all(|_| matches!(limit.admit(a), Ok(None))));
    }
}
