//! Reading the script's answers, and what a stream read means for a
//! position: the same rules as the memory engine's streams.

use std::sync::Arc;
use std::time::Duration;

use redis::Value;

use crate::engine::Unavailable;
use crate::streams::{Entry, Page, Position, Resume};

/// An answer that is not what the script gives: a bug, or another program
/// writing our keys.
pub(super) fn malformed(what: &str) -> Unavailable {
    Unavailable(format!("unexpected answer from Redis ({what})"))
}

/// A bulk or simple string's text.
pub(super) fn text(value: &Value) -> Option<&str> {
    match value {
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

/// An integer, or a string of digits.
pub(super) fn int(value: &Value) -> Option<u64> {
    match value {
        Value::Int(n) => u64::try_from(*n).ok(),
        other => text(other)?.parse().ok(),
    }
}

/// The elements of an array.
pub(super) fn array(value: Value) -> Option<Vec<Value>> {
    match value {
        Value::Array(items) | Value::Set(items) => Some(items),
        Value::Nil => Some(Vec::new()),
        _ => None,
    }
}

/// A stream's position and entries, as the script's `read` gives them.
#[derive(Debug)]
pub(super) struct Read {
    /// The stream's epoch.
    pub epoch: Arc<str>,
    /// Its last offset.
    pub top: u64,
    /// Redis's clock, in milliseconds since the Unix epoch.
    pub now_ms: u64,
    /// The entries read, in the order read.
    pub entries: Vec<Entry>,
}

impl Read {
    /// Parses `{epoch, top, now, entries}` from `items`.
    pub(super) fn parse(items: &mut Vec<Value>) -> Result<Self, Unavailable> {
        if items.len() < 4 {
            return Err(malformed("a read"));
        }
        let raw_entries = items.pop().and_then(array).ok_or(malformed("entries"))?;
        let now_ms = int(&items[2]).ok_or(malformed("time"))?;
        let top = int(&items[1]).ok_or(malformed("top"))?;
        let epoch: Arc<str> = text(&items[0]).ok_or(malformed("epoch"))?.into();
        let entries = raw_entries
            .into_iter()
            .map(entry)
            .collect::<Option<Vec<_>>>()
            .ok_or(malformed("an entry"))?;
        items.truncate(0);
        Ok(Self {
            epoch,
            top,
            now_ms,
            entries,
        })
    }

    /// The position of the stream read.
    pub(super) fn position(&self) -> Position {
        Position {
            epoch: self.epoch.clone(),
            offset: self.top,
        }
    }

    /// Drops the entries older than `ttl`, as the memory engine would hold
    /// them no longer.
    fn fresh(mut self, ttl: Duration) -> Self {
        let ttl = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let now = self.now_ms;
        self.entries.retain(|e| e.at_ms.saturating_add(ttl) > now);
        self
    }

    /// What came after `since`: all of it (the read asked for every entry
    /// up to the top) or nothing.
    pub(super) fn resume(self, since: &Position, ttl: Duration) -> Resume {
        if since.epoch != self.epoch {
            return Resume::Lost;
        }
        if since.offset > self.top {
            return Resume::Ahead;
        }
        let read = self.fresh(ttl);
        let wanted = read.top - since.offset;
        let whole = read.entries.len() as u64 == wanted
            && read
                .entries
                .iter()
                .zip(since.offset + 1..)
                .all(|(e, offset)| e.offset == offset);
        if whole {
            Resume::Recovered(read.entries)
        } else {
            Resume::Lost
        }
    }

    /// A page for the history API: after `since`, or the latest (the read
    /// gave those newest first).
    pub(super) fn page(self, since: Option<&Position>, ttl: Duration) -> (Page, Position) {
        let position = self.position();
        let Some(since) = since else {
            let mut read = self.fresh(ttl);
            read.entries.reverse();
            return (Page::Messages(read.entries), position);
        };
        if since.epoch != self.epoch {
            return (Page::Lost, position);
        }
        if since.offset > self.top {
            return (Page::Ahead, position);
        }
        let read = self.fresh(ttl);
        match read.entries.first() {
            Some(first) if first.offset != since.offset + 1 => (Page::Lost, position),
            None if since.offset < read.top => (Page::Lost, position),
            _ => (Page::Messages(read.entries), position),
        }
    }
}

/// One stream entry: `[id, [field, value, ...]]`, its id `OFFSET-0`.
fn entry(value: Value) -> Option<Entry> {
    let mut pair = array(value)?;
    let fields = array(pair.pop()?)?;
    let offset = text(pair.first()?)?.split('-').next()?.parse().ok()?;
    let (mut payload, mut from, mut at_ms) = (None, None, None);
    for field in fields.chunks(2) {
        let [name, value] = field else { return None };
        match text(name)? {
            "p" => payload = Some(Arc::from(text(value)?)),
            "f" => from = Some(text(value)?).filter(|f| !f.is_empty()).map(Arc::from),
            "a" => at_ms = Some(int(value)?),
            _ => {}
        }
    }
    Some(Entry {
        offset,
        from,
        payload: payload?,
        at_ms: at_ms?,
    })
}
