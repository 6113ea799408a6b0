//! A topic's presence: its client ids, each with its number of subscribed
//! connections, read in pages by id.
//!
//! Most topics have few members (a topic per user has one), kept in a hash
//! map: a hash map of one member takes about 128 bytes, where a B-tree's
//! first node alone takes about 280. A page of such a topic is a scan of
//! every member. A topic grown past [`ORDERED`] members moves to a B-tree,
//! where a page is a range read: walking `n` members in pages of `limit`
//! then costs about `n + (n / limit) log n` rather than `n * n / limit`.

use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::ops::Bound;

use crate::ClientId;

/// Members past which a topic keeps them in id order. It stays ordered if
/// it shrinks again (it is dropped once empty, with its topic).
const ORDERED: usize = 512;

/// A topic's client ids and their connection counts.
pub(crate) enum Members {
    Few(HashMap<ClientId, usize>),
    Many(BTreeMap<ClientId, usize>),
}

impl Default for Members {
    fn default() -> Self {
        Self::Few(HashMap::new())
    }
}

impl Members {
    /// One more connection of `client`; true if it is the client's first.
    pub(crate) fn join(&mut self, client: &ClientId) -> bool {
        if let Self::Few(few) = self
            && few.len() >= ORDERED
            && !few.contains_key(client)
        {
            *self = Self::Many(std::mem::take(few).into_iter().collect());
        }
        let count = match self {
            Self::Few(few) => few.entry(client.clone()).or_default(),
            Self::Many(many) => many.entry(client.clone()).or_default(),
        };
        *count += 1;
        *count == 1
    }

    /// One connection of `client` fewer; true if it was the client's last.
    ///
    /// # Panics
    /// If `client` has no connection here: the caller counts connections.
    pub(crate) fn leave(&mut self, client: &str) -> bool {
        let count = match self {
            Self::Few(few) => few.get_mut(client),
            Self::Many(many) => many.get_mut(client),
        };
        let count = count.expect("members mirror subscribers");
        *count -= 1;
        if *count > 0 {
            return false;
        }
        match self {
            Self::Few(few) => few.remove(client),
            Self::Many(many) => many.remove(client),
        };
        true
    }

    /// Up to `most` members, in no particular order.
    pub(crate) fn some(&self, most: usize) -> Vec<(ClientId, usize)> {
        let owned = |(client, count): (&ClientId, &usize)| (client.clone(), *count);
        match self {
            Self::Few(few) => few.iter().take(most).map(owned).collect(),
            Self::Many(many) => many.iter().take(most).map(owned).collect(),
        }
    }

    /// Up to `limit` of the members whose ids sort after `after` (byte
    /// order), in that order; and whether more follow.
    pub(crate) fn page(&self, after: Option<&str>, limit: usize) -> (Vec<(ClientId, usize)>, bool) {
        let owned = |(client, count): (&ClientId, usize)| (client.clone(), count);
        match self {
            Self::Many(many) => {
                let from = after.map_or(Bound::Unbounded, Bound::Excluded);
                let mut later = many.range::<str, _>((from, Bound::Unbounded));
                let page = later
                    .by_ref()
                    .take(limit)
                    .map(|(client, &count)| owned((client, count)))
                    .collect();
                (page, later.next().is_some())
            }
            Self::Few(few) => {
                // A max-heap of the smallest ids so far: its top is the first
                // to give way.
                let mut page: BinaryHeap<(&ClientId, usize)> =
                    BinaryHeap::with_capacity(limit.min(ORDERED) + 1);
                let mut more = false;
                let later = few
                    .iter()
                    .filter(|(client, _)| after.is_none_or(|after| &***client > after));
                for (client, &count) in later {
                    page.push((client, count));
                    if page.len() > limit {
                        page.pop();
                        more = true;
                    }
                }
                (
                    page.into_sorted_vec().into_iter().map(owned).collect(),
                    more,
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: usize) -> ClientId {
        ClientId::from(format!("id{n:05}"))
    }

    /// Every member once, in order, and the counts, through pages of
    /// `limit`.
    fn walk(members: &Members, limit: usize) -> Vec<(ClientId, usize)> {
        let mut walked: Vec<(ClientId, usize)> = Vec::new();
        loop {
            let after = walked.last().map(|(client, _)| client.clone());
            let (page, more) = members.page(after.as_deref(), limit);
            assert!(page.len() <= limit);
            walked.extend(page);
            if !more {
                return walked;
            }
        }
    }

    #[test]
    fn a_topic_grown_past_the_bound_keeps_its_counts_and_pages_alike() {
        let mut members = Members::default();
        let mut expected = Vec::new();
        // Joined in an order unlike the ids', every third twice.
        for (joined, n) in (0..ORDERED + 100)
            .map(|n| (n * 7919) % (ORDERED + 100))
            .enumerate()
        {
            if joined == ORDERED {
                assert!(
                    matches!(members, Members::Few(_)),
                    "unordered up to the bound"
                );
            }
            let twice = n % 3 == 0;
            assert!(members.join(&id(n)), "a first connection");
            if twice {
                assert!(!members.join(&id(n)), "a second connection");
            }
            expected.push((id(n), if twice { 2 } else { 1 }));
        }
        assert!(
            matches!(members, Members::Many(_)),
            "ordered past the bound"
        );
        expected.sort();
        for limit in [1, 40, 1000] {
            assert_eq!(walk(&members, limit), expected, "pages of {limit}");
        }
        assert_eq!(members.page(Some("zz"), 10), (Vec::new(), false));
        assert_eq!(members.page(None, 0), (Vec::new(), true));
        // Leaving: a count goes down, and the member goes with its last.
        assert!(!members.leave("id00000"));
        assert!(members.leave("id00000"));
        assert!(members.leave("id00001"));
        assert_eq!(walk(&members, 100), expected[2..]);
        assert_eq!(members.some(5).len(), 5);
    }

    #[test]
    fn a_small_topic_pages_by_id_too() {
        let mut members = Members::default();
        for n in [5, 3, 9, 1] {
            members.join(&id(n));
        }
        let ids =
            |page: Vec<(ClientId, usize)>| page.into_iter().map(|(c, _)| c).collect::<Vec<_>>();
        let (first, more) = members.page(None, 2);
        assert_eq!((ids(first), more), (vec![id(1), id(3)], true));
        let (rest, more) = members.page(Some("id00003"), 2);
        assert_eq!((ids(rest), more), (vec![id(5), id(9)], false));
        assert_eq!(members.page(None, 0), (Vec::new(), true));
    }
}
