//! Streams: the history of each client id's inbox and of each topic that
//! keeps one, in memory (the memory engine's store).
//!
//! Every message appended to a stream gets the next offset: a u64,
//! contiguous per stream, from 1. A stream has an epoch, a short string of
//! its own (see [`crate::epochs`]), so (epoch, offset) never names two
//! different messages: a stream made again after the cap dropped it gets
//! another epoch. A stream that was never written holds nothing at all: its
//! position is the epoch it will be made with at offset 0, which is what a
//! client that has seen nothing resumes from. Resuming is all or nothing: a
//! position is recovered only when every message after it is still held.
//!
//! What the store holds is bounded by one byte cap, whatever clients do: the
//! streams are split over shards, each with its share of the cap, and a shard
//! over its share drops its oldest messages first (and then streams that hold
//! none). Each stream also keeps at most its retention's count and age.
//!
//! Appending runs a callback under the stream's shard lock, so that the
//! caller can hand the message to live connections in offset order: two
//! appends to one stream cannot pass each other on the way out.

use std::collections::VecDeque;
use std::hash::{Hash, Hasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hashbrown::Equivalent;
use hashbrown::hash_map::{HashMap, RawEntryMut};
use switchboard::Spread;

use crate::epochs::{Epochs, Kept};

/// Which stream: a client id's inbox or a topic's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamKey {
    /// Messages sent to a client id.
    Inbox(Arc<str>),
    /// Messages published to a topic.
    Topic(Arc<str>),
}

impl StreamKey {
    fn name(&self) -> &str {
        self.borrowed().name()
    }

    /// The key, borrowed.
    pub fn borrowed(&self) -> StreamRef<'_> {
        match self {
            Self::Inbox(name) => StreamRef::Inbox(name),
            Self::Topic(name) => StreamRef::Topic(name),
        }
    }
}

impl Hash for StreamKey {
    /// As its [`StreamRef`] hashes, so that either finds the stream.
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.borrowed().hash(state);
    }
}

/// A [`StreamKey`] that borrows its name: appending to a stream that exists
/// makes no key (a message to 2,000 targets would otherwise allocate 2,000).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamRef<'a> {
    /// A client id's inbox.
    Inbox(&'a str),
    /// A topic's history.
    Topic(&'a str),
}

impl<'a> StreamRef<'a> {
    fn name(self) -> &'a str {
        match self {
            Self::Inbox(name) | Self::Topic(name) => name,
        }
    }

    /// The owned key, for a stream made now.
    fn to_key(self) -> StreamKey {
        match self {
            Self::Inbox(name) => StreamKey::Inbox(name.into()),
            Self::Topic(name) => StreamKey::Topic(name.into()),
        }
    }
}

impl Equivalent<StreamKey> for StreamRef<'_> {
    fn equivalent(&self, key: &StreamKey) -> bool {
        *self == key.borrowed()
    }
}

/// A place in a stream: its epoch and an offset (0 before the first message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// The stream's epoch.
    pub epoch: Arc<str>,
    /// The offset of the last message up to this place.
    pub offset: u64,
}

/// One message in a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its offset.
    pub offset: u64,
    /// Who sent it, when a client did.
    pub from: Option<Arc<str>>,
    /// The payload's JSON text, as sent.
    pub payload: Arc<str>,
    /// When it was appended, in milliseconds since the Unix epoch (wall
    /// clock: ages must mean the same after a restart).
    pub at_ms: u64,
}

impl Entry {
    /// What the entry counts against the byte cap.
    fn cost(&self) -> usize {
        ENTRY_OVERHEAD + self.payload.len() + self.from.as_deref().map_or(0, str::len)
    }
}

/// One stream as a snapshot holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// Which stream.
    pub key: StreamKey,
    /// Its epoch.
    pub epoch: Arc<str>,
    /// Its last offset.
    pub top: u64,
    /// The messages it holds, oldest first, ending at `top`.
    pub entries: Vec<Entry>,
}

/// What one stream keeps, at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Messages.
    pub max_entries: usize,
    /// Age.
    pub ttl: Duration,
}

/// A page of a stream, for reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Page {
    /// Messages, oldest first (possibly none).
    Messages(Vec<Entry>),
    /// The position asked for is no longer held (or has another epoch).
    Lost,
    /// The offset is past the stream's last.
    Ahead,
}

/// The answer to "what came after this position?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// Every message after the position, in order (possibly none).
    Recovered(Vec<Entry>),
    /// The position cannot be recovered: another epoch, or messages after it
    /// are no longer held. Nothing is replayed.
    Lost,
    /// The offset is past the stream's last: not a position this stream gave.
    Ahead,
}

/// Bytes counted for an entry beyond its payload and sender: its fields, its
/// place in the stream and in the shard's eviction order, and the `Arc`s.
const ENTRY_OVERHEAD: usize = 96;
/// Bytes counted for a stream beyond its key: its map slot and its fields.
const STREAM_OVERHEAD: usize = 160;
/// Shards, each with its own lock and its share of the cap.
const SHARDS: usize = 16;

/// Streams in memory, bounded by a byte cap.
#[derive(Debug)]
pub struct Streams {
    shards: Box<[Mutex<Shard>]>,
    /// Picks a key's shard; the shard's map hashes the key (with SipHash) once.
    spread: Spread,
    shard_cap: usize,
    /// The epoch each stream is made with.
    epochs: Epochs,
}

#[derive(Debug, Default)]
struct Shard {
    /// SipHash (std's keyed `RandomState`): the keys are client ids and topic
    /// names that clients choose, held for as long as the process runs.
    streams: HashMap<StreamKey, Stream, RandomState>,
    /// Entries in the order they were appended, for evicting the oldest;
    /// places of entries pruned since are skipped, and swept now and then.
    order: VecDeque<(StreamKey, u64)>,
    /// Streams that came to hold no entries, in the order they did, each
    /// with its top then: the first to go when the shard is over its cap,
    /// before any message. Places of streams written since are skipped, and
    /// swept now and then.
    empties: VecDeque<(StreamKey, u64)>,
    /// Entries held.
    held: usize,
    bytes: usize,
}

#[derive(Debug)]
struct Stream {
    epoch: Arc<str>,
    top: u64,
    entries: VecDeque<Entry>,
}

impl Stream {
    fn new(epoch: Arc<str>) -> Self {
        Self {
            epoch,
            top: 0,
            entries: VecDeque::new(),
        }
    }

    fn position(&self) -> Position {
        Position {
            epoch: self.epoch.clone(),
            offset: self.top,
        }
    }

    /// Gives back the room of entries dropped: a stream that once held many
    /// (a burst, a topic's whole `history_size`) and now holds few would keep
    /// its ring's whole capacity, which the byte cap does not count (48 B a
    /// slot: 49 KB for a topic of 1,000 emptied), and anyone could make many.
    fn shrink(&mut self) {
        let (len, capacity) = (self.entries.len(), self.entries.capacity());
        if len == 0 {
            self.entries = VecDeque::new();
        } else if capacity > 8 && len < capacity / 4 {
            self.entries.shrink_to(len * 2);
        }
    }

    /// Where `since` falls in the stream.
    fn place(&self, since: &Position) -> Place {
        if since.epoch != self.epoch {
            return Place::Lost;
        }
        if since.offset > self.top {
            return Place::Ahead;
        }
        let first = self.top - self.entries.len() as u64 + 1;
        if since.offset + 1 < first {
            // The message right after it is no longer held.
            Place::Lost
        } else {
            Place::After((since.offset + 1 - first) as usize)
        }
    }
}

/// Where a position falls in a stream.
enum Place {
    /// In it: the messages after it start at this index of those held.
    After(usize),
    /// Not in it: another epoch, or the message after it is gone.
    Lost,
    /// Past its last offset.
    Ahead,
}

impl Streams {
    /// An empty store that holds at most `max_bytes`, counted as payloads and
    /// senders plus a fixed overhead per message and per stream.
    pub fn new(max_bytes: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            spread: Spread::new(),
            shard_cap: max_bytes / SHARDS,
            epochs: Epochs::default(),
        }
    }

    /// A store with `streams` in it (a snapshot's), whose streams not yet
    /// made get their epochs from `epochs`; the cap applies from the start.
    pub fn restore(max_bytes: usize, epochs: Epochs, streams: Vec<Restored>) -> Self {
        let store = Self {
            epochs,
            ..Self::new(max_bytes)
        };
        // Each shard's messages in the order they were appended, whatever
        // the order of the streams: the oldest are the first to go.
        let mut places: Vec<Vec<(u64, StreamKey, u64)>> = vec![Vec::new(); SHARDS];
        for restored in streams {
            let index = store.index(restored.key.name());
            let mut shard = lock(&store.shards[index]);
            shard.bytes += STREAM_OVERHEAD + restored.key.name().len();
            // A stream's places keep its offsets' order: a message may be
            // stamped a little before one appended ahead of it (a send to many
            // ids reads the time once), and a place out of turn would be
            // skipped as stale, leaving its entry out of the cap's reach.
            let mut at_ms = 0;
            for entry in &restored.entries {
                shard.bytes += entry.cost();
                shard.held += 1;
                at_ms = entry.at_ms.max(at_ms);
                places[index].push((at_ms, restored.key.clone(), entry.offset));
            }
            if restored.entries.is_empty() {
                shard
                    .empties
                    .push_back((restored.key.clone(), restored.top));
            }
            let stream = Stream {
                epoch: restored.epoch,
                top: restored.top,
                entries: restored.entries.into(),
            };
            shard.streams.insert(restored.key, stream);
        }
        for (shard, mut places) in store.shards.iter().zip(places) {
            // Stable: a stream's messages of one millisecond keep their order.
            places.sort_by_key(|&(at_ms, ..)| at_ms);
            let mut shard = lock(shard);
            shard.order = places
                .into_iter()
                .map(|(_, key, offset)| (key, offset))
                .collect();
            store.evict(&mut shard, None);
        }
        store
    }

    /// Every stream as it is now, for a snapshot, and the epochs' seed and
    /// drop counts. Each shard is copied under its lock, one at a time.
    pub fn export(&self) -> (Kept, Vec<Restored>) {
        let mut streams = Vec::new();
        for shard in &self.shards {
            let shard = lock(shard);
            streams.extend(shard.streams.iter().map(|(key, stream)| Restored {
                key: key.clone(),
                epoch: stream.epoch.clone(),
                top: stream.top,
                entries: stream.entries.iter().cloned().collect(),
            }));
        }
        // Read last: a stream dropped while the shards were copied has
        // counted its drop, and its next incarnation must not reuse its epoch.
        (self.epochs.export(), streams)
    }

    /// Bytes held now, counted as the cap counts them.
    pub fn bytes(&self) -> usize {
        self.shards.iter().map(|shard| lock(shard).bytes).sum()
    }

    /// Appends a message to `key`'s stream (made if missing), as appended at
    /// `at_ms` (ms since the Unix epoch, [`now_ms`]: a message sent to many
    /// streams has one time), and runs `then` with the new entry, the
    /// stream's epoch and its key, under the stream's lock: what `then` hands
    /// on goes out in offset order.
    pub fn append<R>(
        &self,
        key: StreamRef<'_>,
        from: Option<Arc<str>>,
        payload: Arc<str>,
        retention: Retention,
        at_ms: u64,
        then: impl FnOnce(&Entry, &Arc<str>, &StreamKey) -> R,
    ) -> R {
        let mut guard = self.shard(key.name());
        let shard = &mut *guard;
        let (stored, stream) = match shard.streams.raw_entry_mut().from_key(&key) {
            RawEntryMut::Occupied(found) => {
                let (stored, stream) = found.into_key_value();
                (&*stored, stream)
            }
            RawEntryMut::Vacant(vacant) => {
                shard.bytes += STREAM_OVERHEAD + key.name().len();
                let (stored, stream) =
                    vacant.insert(key.to_key(), Stream::new(self.epochs.of(key)));
                (&*stored, stream)
            }
        };
        stream.top += 1;
        let entry = Entry {
            offset: stream.top,
            from,
            payload,
            at_ms,
        };
        shard.bytes += entry.cost();
        // A clone is two reference counts: the entry is handed on even when
        // the retention keeps none (history off).
        stream.entries.push_back(entry.clone());
        shard.order.push_back((stored.clone(), stream.top));
        let (count, bytes) = prune(stream, retention, at_ms);
        shard.held = shard.held + 1 - count;
        shard.bytes -= bytes;
        if stream.entries.is_empty() {
            // History off (or expiring at once): held as a position alone.
            shard.empties.push_back((stored.clone(), stream.top));
        }
        let epoch = stream.epoch.clone();
        let result = then(&entry, &epoch, stored);
        self.evict(shard, Some(key));
        result
    }

    /// Where `key`'s stream is now, and `then` run with it under the stream's
    /// lock. Nothing is made for a stream never written.
    pub fn position<R>(&self, key: &StreamKey, then: impl FnOnce(&Position) -> R) -> R {
        let shard = self.shard(key.name());
        let position = match shard.streams.get(key) {
            Some(stream) => stream.position(),
            None => Position {
                epoch: self.epochs.of(key.borrowed()),
                offset: 0,
            },
        };
        then(&position)
    }

    /// What came after `since` in `key`'s stream, at most `limit` messages of
    /// it (`Resume::Lost` when more than that was missed), and the stream's
    /// position; `then` runs with both under the stream's lock, so that a
    /// caller that registers for live messages in it misses none and gets
    /// none twice.
    pub fn resume<R>(
        &self,
        key: &StreamKey,
        since: &Position,
        retention: Retention,
        limit: usize,
        then: impl FnOnce(Resume, &Position) -> R,
    ) -> R {
        self.with_stream(key, retention, |stream| {
            let resume = match stream.place(since) {
                Place::Lost => Resume::Lost,
                Place::Ahead => Resume::Ahead,
                Place::After(skip) if stream.entries.len() - skip > limit => Resume::Lost,
                Place::After(skip) => {
                    Resume::Recovered(stream.entries.iter().skip(skip).cloned().collect())
                }
            };
            then(resume, &stream.position())
        })
    }

    /// Runs `then` under the lock with `key`'s stream, pruned to `retention`,
    /// or with an empty one in the epoch it would be made with (a stream
    /// never written is not made for being read).
    fn with_stream<R>(
        &self,
        key: &StreamKey,
        retention: Retention,
        then: impl FnOnce(&Stream) -> R,
    ) -> R {
        let mut guard = self.shard(key.name());
        let shard = &mut *guard;
        match shard.streams.get_mut(key) {
            Some(stream) => {
                let (count, bytes) = prune(stream, retention, now_ms());
                shard.held -= count;
                shard.bytes -= bytes;
                if count > 0 && stream.entries.is_empty() {
                    shard.empties.push_back((key.clone(), stream.top));
                }
                then(stream)
            }
            None => then(&Stream::new(self.epochs.of(key.borrowed()))),
        }
    }

    /// While the shard is over its cap, drops the streams that hold no
    /// entries (the longest empty first; not `keep`, the one in use), and
    /// only then the oldest entries. An empty stream holds no message, only
    /// its position: with many recipients, their positions pushed every
    /// message out first, down to the one just appended. A dropped stream
    /// counts in [`Epochs`]: made again, it never reuses its old epoch, so no
    /// position in it is ever recovered wrongly (a client resuming in it is
    /// told `recovered: false`, having missed nothing).
    fn evict(&self, shard: &mut Shard, keep: Option<StreamRef<'_>>) {
        let cap = self.shard_cap;
        let mut kept = None;
        while shard.bytes > cap {
            if let Some((key, top)) = shard.empties.pop_front() {
                let empty = (shard.streams.get(&key))
                    .is_some_and(|stream| stream.entries.is_empty() && stream.top == top);
                if empty && Some(key.borrowed()) == keep {
                    kept = Some((key, top));
                } else if empty {
                    shard.streams.remove(&key);
                    shard.bytes -= STREAM_OVERHEAD + key.name().len();
                    self.epochs.dropped(key.borrowed());
                }
                continue;
            }
            let Some((key, offset)) = shard.order.pop_front() else {
                break;
            };
            let Some(stream) = shard.streams.get_mut(&key) else {
                continue;
            };
            if stream.entries.front().is_some_and(|e| e.offset == offset) {
                let entry = stream.entries.pop_front().expect("checked");
                stream.shrink();
                shard.held -= 1;
                shard.bytes -= entry.cost();
                if stream.entries.is_empty() {
                    shard.empties.push_back((key, stream.top));
                }
            }
        }
        if let Some(kept) = kept {
            shard.empties.push_front(kept);
        }
        // Places of streams written (or dropped) since they emptied.
        // Twice the streams: a sweep frees at least as many places as it
        // reads streams, so it costs a constant per place on average.
        if shard.empties.len() > 2 * shard.streams.len() + 64 {
            let streams = &shard.streams;
            shard.empties.retain(|(key, top)| {
                streams
                    .get(key)
                    .is_some_and(|s| s.entries.is_empty() && s.top == *top)
            });
        }
        // Stale places (entries already pruned) would otherwise pile up in a
        // shard whose streams are pruned by count or age before the cap.
        if shard.order.len() > 2 * shard.held + 64 {
            let streams = &shard.streams;
            shard.order.retain(|(key, offset)| {
                streams
                    .get(key)
                    .and_then(|s| s.entries.front())
                    .is_some_and(|front| front.offset <= *offset)
            });
        }
    }

    /// Up to `limit` messages of `key`'s stream for reading (the history
    /// API), fewer when their payloads and senders pass `max_bytes` (but
    /// never none): with no `since`, the latest; with one, those right after
    /// it, oldest first (`Page::Lost` when the stream no longer holds the
    /// message right after it, or has another epoch).
    pub fn read(
        &self,
        key: &StreamKey,
        since: Option<&Position>,
        retention: Retention,
        limit: usize,
        max_bytes: usize,
    ) -> (Page, Position) {
        self.with_stream(key, retention, |stream| {
            let held = &stream.entries;
            let page = match since.map(|since| stream.place(since)) {
                None => {
                    let mut newest = within(held.iter().rev().take(limit), max_bytes);
                    newest.reverse();
                    newest
                }
                Some(Place::After(skip)) => within(held.iter().skip(skip).take(limit), max_bytes),
                Some(Place::Lost) => return (Page::Lost, stream.position()),
                Some(Place::Ahead) => return (Page::Ahead, stream.position()),
            };
            (Page::Messages(page), stream.position())
        })
    }

    /// The shard of the stream named `name`.
    fn shard(&self, name: &str) -> MutexGuard<'_, Shard> {
        lock(&self.shards[self.index(name)])
    }

    /// The index of the shard that holds `name`'s stream.
    fn index(&self, name: &str) -> usize {
        self.spread.shard(name.as_bytes(), self.shards.len())
    }
}

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The first of `entries` while their payloads and senders stay within
/// `max_bytes`, and always the first one.
fn within<'a>(entries: impl Iterator<Item = &'a Entry>, max_bytes: usize) -> Vec<Entry> {
    let mut bytes = 0;
    entries
        .take_while(|entry| {
            let first = bytes == 0;
            bytes += entry.payload.len() + entry.from.as_deref().map_or(0, str::len);
            first || bytes <= max_bytes
        })
        .cloned()
        .collect()
}

/// Drops what `stream` keeps beyond its retention; returns how many entries
/// and bytes were freed. Their places in the shard's eviction order go stale
/// and are skipped.
fn prune(stream: &mut Stream, retention: Retention, now: u64) -> (usize, usize) {
    let ttl = u64::try_from(retention.ttl.as_millis()).unwrap_or(u64::MAX);
    let (mut count, mut freed) = (0, 0);
    while let Some(front) = stream.entries.front() {
        let too_many = stream.entries.len() > retention.max_entries;
        let too_old = front.at_ms.saturating_add(ttl) <= now;
        if !(too_many || too_old) {
            break;
        }
        freed += front.cost();
        count += 1;
        stream.entries.pop_front();
    }
    if count > 0 {
        stream.shrink();
    }
    (count, freed)
}

/// The wall clock, in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEEP_ALL: Retention = Retention {
        max_entries: usize::MAX,
        ttl: Duration::from_secs(3600),
    };

    fn inbox(id: &str) -> StreamKey {
        StreamKey::Inbox(id.into())
    }

    fn append(streams: &Streams, key: &StreamKey, payload: &str) -> (u64, Arc<str>) {
        let at = now_ms();
        streams.append(
            key.borrowed(),
            None,
            payload.into(),
            KEEP_ALL,
            at,
            |entry, epoch, _| (entry.offset, epoch.clone()),
        )
    }

    fn resume(streams: &Streams, key: &StreamKey, since: &Position) -> Resume {
        streams.resume(key, since, KEEP_ALL, 1000, |resume, _| resume)
    }

    #[test]
    fn offsets_are_contiguous_per_stream_from_one_under_one_epoch() {
        let streams = Streams::new(1 << 20);
        let (a, b) = (inbox("a"), inbox("b"));
        let epoch = streams.position(&a, |p| {
            assert_eq!(p.offset, 0);
            p.epoch.clone()
        });
        assert_eq!(streams.bytes(), 0, "a stream never written holds nothing");
        assert_eq!(append(&streams, &a, "1"), (1, epoch.clone()));
        assert_eq!(append(&streams, &b, "x").0, 1, "each stream counts its own");
        assert_eq!(append(&streams, &a, "2"), (2, epoch.clone()));
        assert_eq!(epoch.len(), 8);
    }

    #[test]
    fn resuming_is_all_or_nothing() {
        let streams = Streams::new(1 << 20);
        let key = inbox("a");
        for n in 1..=5 {
            append(&streams, &key, &n.to_string());
        }
        let epoch = streams.position(&key, |p| p.epoch.clone());
        let at = |offset| Position {
            epoch: epoch.clone(),
            offset,
        };
        let Resume::Recovered(missed) = resume(&streams, &key, &at(2)) else {
            panic!("recoverable");
        };
        let payloads: Vec<&str> = missed.iter().map(|e| &*e.payload).collect();
        assert_eq!(payloads, ["3", "4", "5"]);
        assert_eq!(resume(&streams, &key, &at(5)), Resume::Recovered(vec![]));
        assert_eq!(resume(&streams, &key, &at(6)), Resume::Ahead);
        let other = Position {
            epoch: "zzzzzzzz".into(),
            offset: 2,
        };
        assert_eq!(resume(&streams, &key, &other), Resume::Lost);
        // Over the limit of a resume: nothing, rather than part.
        let limited = streams.resume(&key, &at(0), KEEP_ALL, 4, |resume, _| resume);
        assert_eq!(limited, Resume::Lost);
        // Past the retention of three: offset 1 is gone, so 0 and 1 are lost.
        let three = Retention {
            max_entries: 3,
            ttl: KEEP_ALL.ttl,
        };
        let lost = streams.resume(&key, &at(1), three, 1000, |resume, _| resume);
        assert_eq!(lost, Resume::Lost);
        let kept = streams.resume(&key, &at(2), three, 1000, |resume, _| resume);
        assert!(matches!(kept, Resume::Recovered(m) if m.len() == 3));
    }

    #[test]
    fn a_stream_that_drops_most_of_its_entries_gives_their_room_back() {
        let streams = Streams::new(1 << 20);
        let key = inbox("burst");
        let capacity = |streams: &Streams| {
            let shard = streams.shard(key.name());
            shard.streams.get(&key).map(|s| s.entries.capacity())
        };
        for i in 0..1000 {
            append(&streams, &key, &i.to_string());
        }
        assert!(capacity(&streams).unwrap() >= 1000);
        // Pruned to three as the next is appended.
        let three = Retention {
            max_entries: 3,
            ttl: KEEP_ALL.ttl,
        };
        streams.append(
            key.borrowed(),
            None,
            "x".into(),
            three,
            now_ms(),
            |_, _, _| (),
        );
        assert!(capacity(&streams).unwrap() <= 8, "{:?}", capacity(&streams));
        // Past their age, all go: nothing is held for the stream's entries.
        let none = Retention {
            max_entries: 3,
            ttl: Duration::ZERO,
        };
        let since = streams.position(&key, |p| p.clone());
        streams.resume(&key, &since, none, 1000, |_, _| ());
        assert_eq!(capacity(&streams), Some(0));
    }

    #[test]
    fn with_no_history_kept_the_message_is_still_handed_on() {
        let streams = Streams::new(1 << 20);
        let none = Retention {
            max_entries: 0,
            ttl: KEEP_ALL.ttl,
        };
        let key = inbox("a");
        let handed = streams.append(
            key.borrowed(),
            None,
            "1".into(),
            none,
            now_ms(),
            |e, _, _| e.payload.clone(),
        );
        assert_eq!(&*handed, "1");
        let at_zero = streams.position(&key, |p| Position {
            offset: 0,
            ..p.clone()
        });
        assert_eq!(resume(&streams, &key, &at_zero), Resume::Lost);
        assert_eq!(
            streams.bytes(),
            STREAM_OVERHEAD + 1,
            "only the stream is held"
        );
    }

    #[test]
    fn old_messages_expire() {
        let streams = Streams::new(1 << 20);
        let key = inbox("a");
        let now = Retention {
            max_entries: 100,
            ttl: Duration::ZERO,
        };
        streams.append(
            key.borrowed(),
            None,
            "1".into(),
            KEEP_ALL,
            now_ms(),
            |_, _, _| (),
        );
        let since = streams.position(&key, |p| Position {
            epoch: p.epoch.clone(),
            offset: 0,
        });
        assert_eq!(
            streams.resume(&key, &since, now, 1000, |resume, _| resume),
            Resume::Lost
        );
    }

    #[test]
    fn the_byte_cap_holds_whatever_is_appended() {
        let cap = 256 * 1024;
        let streams = Streams::new(cap);
        let payload: Arc<str> = "x".repeat(1000).into();
        let key = inbox("client-199");
        let before_any = streams.position(&key, Position::clone);
        for i in 0..2000 {
            let key = inbox(&format!("client-{}", i % 300));
            streams.append(
                key.borrowed(),
                Some("sender".into()),
                payload.clone(),
                KEEP_ALL,
                now_ms(),
                |_, _, _| (),
            );
            assert!(streams.bytes() <= cap, "{} over {cap}", streams.bytes());
        }
        // The newest message is still there; the oldest are gone (with the
        // stream itself, once it held none, and so its first epoch).
        let top = streams.position(&key, |p| p.clone());
        let before = Position {
            offset: top.offset - 1,
            ..top.clone()
        };
        assert!(matches!(resume(&streams, &key, &before), Resume::Recovered(m) if m.len() == 1));
        assert_eq!(resume(&streams, &key, &before_any), Resume::Lost);
    }

    /// Regression: past the cap, every message of a shard went (down to
    /// the one just appended) before a stream that held none: with many
    /// recipients, their positions alone filled the store.
    #[test]
    fn streams_that_hold_no_messages_go_before_any_message() {
        let cap = SHARDS * 16 * 1024;
        let streams = Streams::new(cap);
        let kept = inbox("kept");
        for i in 0..5 {
            append(&streams, &kept, &i.to_string());
        }
        let start = Position {
            offset: 0,
            ..streams.position(&kept, Position::clone)
        };
        let none = Retention {
            max_entries: 0,
            ..KEEP_ALL
        };
        // Positions alone, twice what the cap holds.
        for i in 0..2 * cap / STREAM_OVERHEAD {
            let key = inbox(&format!("quiet-{i}"));
            streams.append(
                key.borrowed(),
                None,
                "1".into(),
                none,
                now_ms(),
                |_, _, _| (),
            );
            assert!(streams.bytes() <= cap, "{} over {cap}", streams.bytes());
        }
        assert!(
            matches!(resume(&streams, &kept, &start), Resume::Recovered(m) if m.len() == 5),
            "the messages stayed"
        );
        let shard = lock(&streams.shards[streams.spread.shard(b"quiet-0", SHARDS)]);
        assert!(shard.empties.len() <= 2 * shard.streams.len() + 64);
    }

    /// Regression: a restored shard's eviction order was its streams'
    /// order in the snapshot (their hash order), not the messages' age: the
    /// first eviction after a restart took newer messages before older ones.
    #[test]
    fn a_restored_store_evicts_its_oldest_messages_first() {
        let now = now_ms();
        let epoch: Arc<str> = "e".into();
        let stream = |name: &str, at_ms| Restored {
            key: inbox(name),
            epoch: epoch.clone(),
            top: 1,
            entries: vec![Entry {
                offset: 1,
                from: None,
                payload: "x".repeat(100).into(),
                at_ms,
            }],
        };
        let names = |prefix: &'static str| (0..200).map(move |i| format!("{prefix}-{i}"));
        // The newer first, as a snapshot may list them; a cap of about half.
        let newer = names("newer").map(|name| stream(&name, now));
        let older = names("older").map(|name| stream(&name, now - 60_000));
        let per_stream = STREAM_OVERHEAD + ENTRY_OVERHEAD + 100 + 9;
        let streams = Streams::restore(
            200 * per_stream,
            Epochs::new("seed".into(), &[]),
            newer.chain(older).collect(),
        );
        let start = Position {
            epoch: epoch.clone(),
            offset: 0,
        };
        let held = |prefix| {
            let held = |name: &String| resume(&streams, &inbox(name), &start) != Resume::Lost;
            names(prefix).filter(held).count()
        };
        let (newer, older) = (held("newer"), held("older"));
        assert!(
            newer > 150 && older < 50,
            "held {newer} newer, {older} older"
        );
    }

    /// Regression (review): a stream whose later message was stamped a
    /// little earlier (a send to many ids reads the time once, before it
    /// waits for each stream) had its places sorted out of offset order on
    /// restore; eviction skipped the first as stale and never reached the
    /// entry, which stayed out of the cap's reach.
    #[test]
    fn a_restored_stream_stamped_out_of_order_is_still_evicted() {
        let now = now_ms();
        let entry = |offset, at_ms| Entry {
            offset,
            from: None,
            payload: "x".repeat(100).into(),
            at_ms,
        };
        let shared = Restored {
            key: inbox("shared"),
            epoch: "e".into(),
            top: 2,
            entries: vec![entry(1, now - 1000), entry(2, now - 1001)],
        };
        let per_entry = ENTRY_OVERHEAD + 100;
        let cap = SHARDS * (STREAM_OVERHEAD + 6 + 2 * per_entry);
        let streams = Streams::restore(cap, Epochs::new("seed".into(), &[]), vec![shared]);
        // Newer messages in the same stream push both old ones out.
        for _ in 0..4 {
            streams.append(
                inbox("shared").borrowed(),
                None,
                "y".repeat(100).into(),
                KEEP_ALL,
                now,
                |_, _, _| (),
            );
        }
        let shard = lock(&streams.shards[streams.index("shared")]);
        assert!(
            shard.bytes <= streams.shard_cap,
            "{} over {}",
            shard.bytes,
            streams.shard_cap
        );
    }

    #[test]
    fn a_stream_made_again_has_a_new_epoch() {
        // A cap so small that a shard holds one stream: the others are dropped.
        let streams = Streams::new(SHARDS * (STREAM_OVERHEAD + ENTRY_OVERHEAD + 16));
        let key = inbox("a");
        let (_, first) = append(&streams, &key, "1");
        for i in 0..200 {
            append(&streams, &inbox(&format!("other-{i}")), "1");
        }
        let again = streams.position(&key, |p| p.clone());
        assert_ne!(again.epoch, first, "dropped, so another epoch");
        assert_eq!(again.offset, 0);
        let old = Position {
            epoch: first,
            offset: 1,
        };
        assert_eq!(resume(&streams, &key, &old), Resume::Lost);
        assert_eq!(append(&streams, &key, "2"), (1, again.epoch));
    }

    #[test]
    fn a_position_in_one_stream_is_never_recovered_in_another() {
        let streams = Streams::new(1 << 20);
        let (a, b) = (inbox("a"), inbox("b"));
        append(&streams, &a, "1");
        append(&streams, &b, "1");
        append(&streams, &b, "2");
        let in_a = streams.position(&a, |p| p.clone());
        assert_eq!(in_a.offset, 1);
        assert_eq!(
            resume(&streams, &b, &in_a),
            Resume::Lost,
            "b's own 2 is not a's"
        );
        let never = inbox("c");
        let at_zero_in_c = streams.position(&never, |p| p.clone());
        let at_zero_in_a = Position {
            offset: 0,
            ..in_a.clone()
        };
        assert_eq!(resume(&streams, &never, &at_zero_in_a), Resume::Lost);
        assert_eq!(resume(&streams, &a, &at_zero_in_c), Resume::Lost);
        assert!(
            matches!(resume(&streams, &a, &at_zero_in_a), Resume::Recovered(m) if m.len() == 1)
        );
    }

    #[test]
    fn dropping_a_stream_leaves_the_streams_never_written_of_other_buckets_alone() {
        let streams = Streams::new(SHARDS * (STREAM_OVERHEAD + ENTRY_OVERHEAD + 16));
        let idle: Vec<StreamKey> = (0..50).map(|i| inbox(&format!("idle-{i}"))).collect();
        let seen: Vec<Position> = idle
            .iter()
            .map(|k| streams.position(k, Position::clone))
            .collect();
        let first = inbox("first");
        append(&streams, &first, "1");
        let mut dropped = vec![first.clone()];
        for i in 0..200 {
            let key = inbox(&format!("other-{i}"));
            append(&streams, &key, "1");
            dropped.push(key);
        }
        assert_eq!(
            streams.position(&first, |p| p.offset),
            0,
            "the cap dropped it"
        );
        let buckets: std::collections::HashSet<usize> = dropped
            .iter()
            .map(|k| streams.epochs.bucket(k.borrowed()))
            .collect();
        let mut untouched = 0;
        for (key, seen) in idle.iter().zip(&seen) {
            if !buckets.contains(&streams.epochs.bucket(key.borrowed())) {
                untouched += 1;
                assert_eq!(resume(&streams, key, seen), Resume::Recovered(vec![]));
            }
        }
        assert!(untouched > 40, "{untouched} of 50 in other buckets");
    }

    #[test]
    fn a_stream_never_written_resumes_from_zero_only() {
        let streams = Streams::new(1 << 20);
        let key = inbox("a");
        let zero = streams.position(&key, |p| p.clone());
        assert_eq!(resume(&streams, &key, &zero), Resume::Recovered(vec![]));
        let ahead = Position {
            offset: 1,
            ..zero.clone()
        };
        assert_eq!(resume(&streams, &key, &ahead), Resume::Ahead);
        let other = Position {
            epoch: "zzzzzzzz".into(),
            offset: 0,
        };
        assert_eq!(resume(&streams, &key, &other), Resume::Lost);
        assert_eq!(streams.bytes(), 0);
    }
}
