//! A memory budget for data received but not yet whole, shared by connections.
//!
//! A peer can make a connection hold memory without finishing anything: the
//! start of a large frame, or the first fragment of a compressed message that
//! inflates a thousandfold. Each connection's limits bound what one peer can
//! hold; a [`ReceiveBudget`] bounds what all of them hold together, so that
//! many small inputs cannot buy a large share of the server's memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use switchboard_proto::{CloseCode, CloseReason};

/// Bytes that connections may hold of partly received data (an unfinished
/// frame, an unfinished message, inflated when compressed), in total and each.
///
/// Cheap to clone: clones share the count. Give one to every connection with
/// [`crate::Options::receive_budget`]. A connection that would go over its
/// share is closed with 1009 (message too big); one that finds the budget
/// spent by others is closed with 1013 (try again later). What a connection
/// holds is counted between reads, as bytes of data: the allocations behind
/// them can be up to twice that.
///
/// # Examples
///
/// ```
/// use switchboard::{Options, ReceiveBudget};
///
/// // 256 MiB for the whole server, 4 MiB for any one connection.
/// let budget = ReceiveBudget::new(256 << 20, 4 << 20);
/// let options = Options::default().receive_budget(Some(budget.clone()));
/// assert_eq!(budget.used(), 0);
/// ```
#[derive(Debug, Clone)]
pub struct ReceiveBudget(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    total: usize,
    per_connection: usize,
    used: AtomicUsize,
    /// The budget a peer's share is part of: what the share holds, it holds too.
    whole: Option<ReceiveBudget>,
}

/// Why a connection may not hold more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exceeded {
    /// It would go over its own share.
    Share,
    /// Its peer's share of the budget is spent (see [`ReceiveBudget::peer_share`]).
    Peer,
    /// The budget is spent.
    Total,
}

impl Exceeded {
    /// The close frame the connection is sent.
    pub(crate) fn close_reason(self) -> CloseReason {
        match self {
            Self::Share => CloseReason::new(
                CloseCode::TOO_BIG,
                "partly received data over this connection's share",
            ),
            Self::Peer => CloseReason::new(
                CloseCode::TRY_AGAIN_LATER,
                "this peer's share of the server receive budget exhausted",
            ),
            Self::Total => CloseReason::new(
                CloseCode::TRY_AGAIN_LATER,
                "server receive budget exhausted",
            ),
        }
    }
}

impl ReceiveBudget {
    /// `total` bytes for every connection together, at most `per_connection` for each.
    pub fn new(total: usize, per_connection: usize) -> Self {
        Self(Arc::new(Shared {
            total,
            per_connection,
            used: AtomicUsize::new(0),
            whole: None,
        }))
    }

    /// A share of this budget for one peer's connections (those of one
    /// address, say): together they hold at most `total` bytes, each at most
    /// what this budget allows one connection, and what they hold counts
    /// against this budget too. Without shares, one peer opening many
    /// connections could spend the whole budget, and every other peer's
    /// large messages would be refused. A connection over its peer's share is
    /// closed with 1013, as one that finds the whole budget spent.
    ///
    /// # Examples
    ///
    /// ```
    /// use switchboard::ReceiveBudget;
    ///
    /// let budget = ReceiveBudget::new(256 << 20, 4 << 20);
    /// let peer = budget.peer_share(64 << 20);
    /// assert_eq!((peer.total(), peer.per_connection()), (64 << 20, 4 << 20));
    /// ```
    pub fn peer_share(&self, total: usize) -> Self {
        Self(Arc::new(Shared {
            total,
            per_connection: self.0.per_connection,
            used: AtomicUsize::new(0),
            whole: Some(self.clone()),
        }))
    }

    /// Bytes held now, by every connection together.
    pub fn used(&self) -> usize {
        self.0.used.load(Ordering::Relaxed)
    }

    /// The budget for every connection together.
    pub fn total(&self) -> usize {
        self.0.total
    }

    /// The most any one connection may hold.
    pub fn per_connection(&self) -> usize {
        self.0.per_connection
    }

    /// Moves one connection's holding from `*held` to `want` bytes. On an
    /// error nothing changes.
    pub(crate) fn resize(&self, held: &mut usize, want: usize) -> Result<(), Exceeded> {
        if want <= *held {
            self.give_back(*held - want);
            *held = want;
            return Ok(());
        }
        if want > self.0.per_connection {
            return Err(Exceeded::Share);
        }
        self.take(want - *held)?;
        *held = want;
        Ok(())
    }

    /// Takes `more` bytes of this budget, and of the budget it is a share of.
    fn take(&self, more: usize) -> Result<(), Exceeded> {
        let shared = &*self.0;
        // Optimistic: add, then take it back if that went over. Another
        // connection may see the sum briefly high and be refused too, which
        // errs on the side of the bound.
        let before = shared.used.fetch_add(more, Ordering::Relaxed);
        let taken = if before + more > shared.total {
            Err(match shared.whole {
                Some(_) => Exceeded::Peer,
                None => Exceeded::Total,
            })
        } else if let Some(whole) = &shared.whole {
            whole.take(more)
        } else {
            Ok(())
        };
        if taken.is_err() {
            shared.used.fetch_sub(more, Ordering::Relaxed);
        }
        taken
    }

    fn give_back(&self, less: usize) {
        self.0.used.fetch_sub(less, Ordering::Relaxed);
        if let Some(whole) = &self.0.whole {
            whole.give_back(less);
        }
    }
}

/// One connection's part of a [`ReceiveBudget`], given back when dropped.
#[derive(Debug)]
pub(crate) struct Holding {
    budget: ReceiveBudget,
    held: usize,
}

impl Holding {
    pub(crate) fn new(budget: ReceiveBudget) -> Self {
        Self { budget, held: 0 }
    }

    /// Holds `want` bytes from now on, if the budget allows.
    pub(crate) fn set(&mut self, want: usize) -> Result<(), Exceeded> {
        if want == self.held {
            return Ok(());
        }
        self.budget.resize(&mut self.held, want)
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        let _ = self.budget.resize(&mut self.held, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_held_to_its_share_and_all_to_the_total() {
        let budget = ReceiveBudget::new(100, 40);
        let mut a = Holding::new(budget.clone());
        let mut b = Holding::new(budget.clone());
        let mut c = Holding::new(budget.clone());
        assert_eq!(a.set(41), Err(Exceeded::Share));
        assert_eq!(a.set(40), Ok(()));
        assert_eq!(b.set(40), Ok(()));
        assert_eq!(c.set(21), Err(Exceeded::Total));
        assert_eq!(budget.used(), 80, "a refusal takes nothing");
        assert_eq!(c.set(20), Ok(()));
        assert_eq!(a.set(10), Ok(()));
        assert_eq!(budget.used(), 70);
        drop(b);
        assert_eq!(
            budget.used(),
            30,
            "a dropped holding gives back what it held"
        );
        drop((a, c));
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_peer_is_held_to_its_share_and_its_share_counts_in_the_whole() {
        let budget = ReceiveBudget::new(100, 40);
        let (greedy, other) = (budget.peer_share(50), budget.peer_share(50));
        let mut a = Holding::new(greedy.clone());
        let mut b = Holding::new(greedy.clone());
        let mut c = Holding::new(other.clone());
        let mut d = Holding::new(budget.clone());
        assert_eq!(a.set(41), Err(Exceeded::Share));
        assert_eq!(a.set(40), Ok(()));
        assert_eq!(b.set(11), Err(Exceeded::Peer), "its peer holds 40 of 50");
        assert_eq!(b.set(10), Ok(()));
        assert_eq!((greedy.used(), budget.used()), (50, 50));
        assert_eq!(c.set(40), Ok(()), "another peer has its own share");
        assert_eq!(d.set(11), Err(Exceeded::Total));
        assert_eq!(c.set(30), Ok(()));
        assert_eq!(d.set(20), Ok(()));
        assert_eq!(
            (other.used(), budget.used()),
            (30, 100),
            "a refusal takes nothing, at either level"
        );
        assert_eq!(c.set(31), Err(Exceeded::Total), "the whole is spent");
        assert_eq!(other.used(), 30);
        drop((a, b, c, d));
        assert_eq!((greedy.used(), other.used(), budget.used()), (0, 0, 0));
    }
}
