//! The memory engine's streams on disk, across a graceful restart.
//!
//! On shutdown the streams are written to `DATA_DIR/streams.snapshot`: first
//! to a temporary file, which is synced and then renamed, so a crash never
//! leaves half a snapshot under the real name. On start a snapshot is read
//! and then removed before anything is served: a snapshot is used once. A
//! crash after that start finds none, so the streams start with new epochs
//! and resuming clients are told `recovered:false`, instead of being told that
//! offsets reused under an old epoch are the messages they missed.
//!
//! (`open` reads it before the service binds its ports; `consume` removes it
//! once they are bound.)
//!
//! The file is JSON lines: a header with the format, the version, and the
//! seed and drop counts the epochs of streams not yet made come from (see
//! [`crate::epochs`]); one line per stream; and an end line with the count,
//! so a truncated file is told from a whole one. A version 1 file (whose
//! header held one epoch for every stream not yet made) is read too: its
//! epoch becomes the seed, so streams never written get new epochs, and
//! clients that resume them are told `recovered:false` once. A file that cannot be read whole
//! stops the start with the reason; `--start-fresh` moves it aside (never
//! deletes it) and starts with empty history.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::epochs::{BUCKETS, Epochs, Kept};
use crate::streams::{Entry, Restored, StreamKey};
use crate::topics::Namespaces;

/// The snapshot's file name in the data directory.
pub const FILE_NAME: &str = "streams.snapshot";
const FORMAT: &str = "switchboard-streams";
const VERSION: u64 = 2;

/// A snapshot that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// It could not be read or removed.
    #[error("snapshot {path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        error: io::Error,
    },
    /// It is not a whole snapshot of this format.
    #[error(
        "snapshot {path} is corrupt at line {line}: {reason}. Nothing was discarded: start with \
         --start-fresh to move it aside and start with empty history (resuming clients are then \
         told recovered:false)"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The first line that is wrong (1-based).
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
}

/// Makes `dir` (readable by this user only) if missing, and takes its lock:
/// one process per data directory, or two could use up, and write, the same
/// snapshot. The lock lasts as long as the returned file is open.
pub fn lock(dir: &Path) -> anyhow::Result<File> {
    try_lock(dir)?.ok_or_else(|| {
        anyhow::anyhow!(
            "another switchboard is using the data directory {} (it holds {}): give each \
             process its own --data-dir",
            dir.display(),
            dir.join("lock").display()
        )
    })
}

/// [`lock`], or `None` when another process holds the lock.
fn try_lock(dir: &Path) -> anyhow::Result<Option<File>> {
    use anyhow::Context as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating the data directory {}", dir.display()))?;
    let path = dir.join("lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(fs::TryLockError::WouldBlock) => Ok(None),
        Err(fs::TryLockError::Error(error)) => {
            Err(error).with_context(|| format!("locking {}", path.display()))
        }
    }
}

/// Writes `streams`, and the epochs' seed and drop counts, to `dir`,
/// atomically. The file is readable by this user only: it holds every
/// payload kept. Returns the snapshot's path.
pub fn save(dir: &Path, epochs: &Kept, streams: &[Restored]) -> io::Result<PathBuf> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let path = dir.join(FILE_NAME);
    let temporary = dir.join(format!("{FILE_NAME}.tmp"));
    let file = File::options()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&temporary)?;
    let mut out = BufWriter::new(file);
    let header = serde_json::json!({
        "format": FORMAT,
        "version": VERSION,
        "epoch": epochs.seed,
        "drops": epochs.drops,
    });
    writeln!(out, "{header}")?;
    let mut line = String::new();
    for stream in streams {
        line.clear();
        write_stream(&mut line, stream);
        writeln!(out, "{line}")?;
    }
    writeln!(
        out,
        "{}",
        serde_json::json!({"end": true, "streams": streams.len()})
    )?;
    let file = out.into_inner().map_err(io::IntoInnerError::into_error)?;
    file.sync_all()?;
    fs::rename(&temporary, &path)?;
    // The rename itself must reach the disk, or a crash could undo it.
    File::open(dir)?.sync_all()?;
    Ok(path)
}

/// One stream as a line. A payload is kept as its text in a JSON string: the
/// text may hold line breaks between its tokens (JSON allows them, and the
/// relay passes payloads on byte for byte), which would break the line.
fn write_stream(line: &mut String, stream: &Restored) {
    let (kind, name) = match &stream.key {
        StreamKey::Inbox(name) => ("inbox", name),
        StreamKey::Topic(name) => ("topic", name),
    };
    let quoted = |text: &str| serde_json::to_string(text).expect("strings serialise");
    let _ = write!(
        line,
        r#"{{"kind":"{kind}","name":{},"epoch":{},"top":{},"entries":["#,
        quoted(name),
        quoted(&stream.epoch),
        stream.top
    );
    for (i, entry) in stream.entries.iter().enumerate() {
        let from = entry.from.as_deref().map_or_else(|| "null".into(), quoted);
        let comma = if i == 0 { "" } else { "," };
        let _ = write!(
            line,
            r#"{comma}{{"offset":{},"from":{from},"at_ms":{},"payload":{}}}"#,
            entry.offset,
            entry.at_ms,
            quoted(&entry.payload)
        );
    }
    line.push_str("]}");
}

/// What a snapshot held: the epochs of streams not yet made and the streams.
#[derive(Debug)]
pub struct Loaded {
    /// The epochs of streams not yet made.
    pub epochs: Epochs,
    /// Every stream.
    pub streams: Vec<Restored>,
}

impl Loaded {
    /// Without the topic streams whose namespace keeps no history now (the
    /// configuration changed across the restart). Each one dropped counts in
    /// the epochs, as the cap's dropping does: were history turned on again,
    /// the topic's new stream must not reuse the old one's epoch.
    pub fn keeping_history_of(mut self, namespaces: &Namespaces) -> Self {
        let epochs = &self.epochs;
        self.streams.retain(|stream| {
            let keep = match &stream.key {
                StreamKey::Inbox(_) => true,
                StreamKey::Topic(topic) => namespaces
                    .find(topic)
                    .is_some_and(|ns| ns.history().is_some()),
            };
            if !keep {
                epochs.dropped(stream.key.borrowed());
            }
            keep
        });
        self
    }
}

/// Reads the snapshot in `dir`, if there is one. With `start_fresh`, one that
/// cannot be read is moved aside and `Ok(None)`
/// returned. The snapshot stays until [`consume`] removes it, once
/// the service is sure to start (a failed start must not lose it). An
/// unreadable one moved aside is named `streams.snapshot.unreadable-NANOS`.
pub fn open(dir: &Path, start_fresh: bool) -> Result<Option<Loaded>, SnapshotError> {
    let path = dir.join(FILE_NAME);
    let io_error = |error| SnapshotError::Io {
        path: path.clone(),
        error,
    };
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(e)),
    };
    match read(BufReader::new(file)) {
        Ok(loaded) => Ok(Some(loaded)),
        Err((line, reason)) if start_fresh => {
            let aside = move_aside(dir, "unreadable").map_err(io_error)?;
            tracing::warn!(
                line,
                reason,
                moved_to = %aside.display(),
                "--start-fresh: the snapshot could not be read; starting with empty history"
            );
            Ok(None)
        }
        Err((line, reason)) => Err(SnapshotError::Corrupt { path, line, reason }),
    }
}

/// Renames the snapshot in `dir` to `streams.snapshot.WHY-NANOS`: kept for
/// the operator, never read again.
fn move_aside(dir: &Path, why: &str) -> io::Result<PathBuf> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let aside = dir.join(format!("{FILE_NAME}.{why}-{nanos}"));
    fs::rename(dir.join(FILE_NAME), &aside)?;
    Ok(aside)
}

/// For a run that serves without the data directory `dir` (`persist = false`,
/// or the Redis engine): a snapshot left there is moved aside
/// (`streams.snapshot.unused-NANOS`), as this run makes it stale. A later
/// start would restore history from before this run under the same epochs,
/// and tell a client that missed what this run sent it that it missed
/// nothing. Left alone while another process holds the directory (that one
/// owns it); nothing is done when there is no snapshot. This run does not
/// need the directory: what keeps the snapshot from being moved (a
/// directory it may not write) is a warning, not a failed start.
pub fn set_aside_unused(dir: &Path) {
    if !dir.join(FILE_NAME).exists() {
        return;
    }
    let moved = try_lock(dir).and_then(|lock| match lock {
        // Another process owns the directory.
        None => Ok(None),
        Some(_lock) => match move_aside(dir, "unused") {
            Ok(aside) => Ok(Some(aside)),
            // Gone meanwhile: a start that held the lock used it up.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        },
    });
    match moved {
        Ok(Some(aside)) => tracing::warn!(
            moved_to = %aside.display(),
            "this run does not use the data directory's snapshot, so a later start must \
             not restore it: moved aside"
        ),
        Ok(None) => {}
        Err(error) => tracing::warn!(
            snapshot = %dir.join(FILE_NAME).display(),
            error = format!("{error:#}"),
            "this run does not use the data directory's snapshot and cannot move it aside: \
             a later start there would restore history from before this run"
        ),
    }
}

/// Removes the snapshot in `dir` that [`open`] read: a snapshot is used once.
pub fn consume(dir: &Path) -> Result<(), SnapshotError> {
    let path = dir.join(FILE_NAME);
    let io_error = |error| SnapshotError::Io {
        path: path.clone(),
        error,
    };
    fs::remove_file(&path).map_err(io_error)?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_error)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    format: String,
    version: u64,
    /// The epochs' seed (in version 1, the epoch of streams not yet made).
    epoch: String,
    /// Drops per bucket (none in version 1).
    #[serde(default)]
    drops: Vec<(usize, u64)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    kind: String,
    name: String,
    epoch: String,
    top: u64,
    entries: Vec<LineEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LineEntry {
    offset: u64,
    from: Option<String>,
    at_ms: u64,
    /// The payload's JSON text.
    payload: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct End {
    end: bool,
    streams: usize,
}

/// Reads a whole snapshot, or says which line (1-based) is wrong and why.
fn read(input: impl BufRead) -> Result<Loaded, (usize, String)> {
    let mut lines = input.lines();
    let mut number = 0;
    let mut next = |what: &str| -> Result<(usize, String), (usize, String)> {
        number += 1;
        match lines.next() {
            Some(Ok(text)) => Ok((number, text)),
            Some(Err(e)) => Err((number, e.to_string())),
            None => Err((number, format!("the file ends before its {what}"))),
        }
    };
    let (n, text) = next("header")?;
    let header: Header = serde_json::from_str(&text).map_err(|e| (n, e.to_string()))?;
    if header.format != FORMAT || !(1..=VERSION).contains(&header.version) {
        return Err((
            n,
            format!("not a {FORMAT} snapshot of version 1 to {VERSION}"),
        ));
    }
    check_epoch(&header.epoch).map_err(|reason| (n, reason))?;
    if let Some((bucket, _)) = header.drops.iter().find(|(b, _)| *b >= BUCKETS) {
        return Err((
            n,
            format!("drop bucket {bucket} is past the last, {}", BUCKETS - 1),
        ));
    }
    let mut streams: Vec<Restored> = Vec::new();
    let mut keys = std::collections::HashSet::new();
    loop {
        let (n, text) = next("end line")?;
        if let Ok(end) = serde_json::from_str::<End>(&text) {
            if !end.end || end.streams != streams.len() {
                let reason = format!("the end line counts {} streams", end.streams);
                return Err((n, format!("{reason}, the file holds {}", streams.len())));
            }
            break;
        }
        let line: Line = serde_json::from_str(&text).map_err(|e| (n, e.to_string()))?;
        let stream = stream(line).map_err(|reason| (n, reason))?;
        if !keys.insert(stream.key.clone()) {
            return Err((n, format!("{:?} appears twice", stream.key)));
        }
        streams.push(stream);
    }
    if let Ok((n, _)) = next("") {
        return Err((n, "lines after the end line".into()));
    }
    Ok(Loaded {
        epochs: Epochs::new(header.epoch.into(), &header.drops),
        streams,
    })
}

fn stream(line: Line) -> Result<Restored, String> {
    let key = match line.kind.as_str() {
        "inbox" => StreamKey::Inbox(line.name.into()),
        "topic" => StreamKey::Topic(line.name.into()),
        other => return Err(format!("unknown stream kind {other:?}")),
    };
    check_epoch(&line.epoch)?;
    if line.top > u64::MAX / 2 {
        return Err(format!(
            "last offset {} is past any this server gives",
            line.top
        ));
    }
    let count = line.entries.len() as u64;
    if count > line.top {
        return Err(format!(
            "{count} messages, but the last offset is {}",
            line.top
        ));
    }
    let first = line.top - count + 1;
    let mut entries = Vec::with_capacity(line.entries.len());
    for (i, entry) in line.entries.into_iter().enumerate() {
        if entry.offset != first + i as u64 {
            return Err(format!(
                "offset {} where {} was due: offsets must be contiguous up to the last",
                entry.offset,
                first + i as u64
            ));
        }
        // Checked as JSON again: a delivery writes it into frames unparsed.
        let payload = RawValue::from_string(entry.payload)
            .map_err(|e| format!("the payload at offset {} is not JSON: {e}", entry.offset))?;
        entries.push(Entry {
            offset: entry.offset,
            from: entry.from.map(Arc::from),
            payload: Arc::from(payload.get()),
            at_ms: entry.at_ms,
        });
    }
    Ok(Restored {
        key,
        epoch: line.epoch.into(),
        top: line.top,
        entries,
    })
}

fn check_epoch(epoch: &str) -> Result<(), String> {
    if (1..=32).contains(&epoch.len()) && epoch.bytes().all(|b| b.is_ascii_alphanumeric()) {
        Ok(())
    } else {
        Err(format!("{epoch:?} is not an epoch"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn restored() -> Vec<Restored> {
        let entry = |offset, payload: &str| Entry {
            offset,
            from: (offset % 2 == 0).then(|| Arc::from("sender \"quoted\"")),
            payload: payload.into(),
            at_ms: 1_700_000_000_000 + offset,
        };
        vec![
            Restored {
                key: StreamKey::Inbox("ada".into()),
                epoch: "k3x9ab12".into(),
                top: 7,
                entries: vec![
                    entry(5, "{\n  \"lines\": [1,\r\n\t2]\n}"),
                    entry(6, r#"{"a": [1, 2.50]}"#),
                    entry(7, "1e999999"),
                ],
            },
            Restored {
                key: StreamKey::Topic("news:1".into()),
                epoch: "zzzz0000".into(),
                top: 3,
                entries: vec![],
            },
        ]
    }

    fn kept() -> Kept {
        Kept {
            seed: "epoch001".into(),
            drops: vec![(5, 2)],
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sb-snapshot-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_snapshot_round_trips_and_is_used_once() {
        let dir = temp_dir("round");
        let kept = Kept {
            seed: "epoch001".into(),
            drops: vec![(5, 2), (4095, 1)],
        };
        let path = save(&dir, &kept, &restored()).unwrap();
        assert!(!dir.join(format!("{FILE_NAME}.tmp")).exists());
        let loaded = open(&dir, false).unwrap().expect("a snapshot");
        assert_eq!(loaded.epochs.export(), kept);
        assert_eq!(loaded.streams, restored(), "payloads byte for byte");
        assert!(path.exists(), "kept until the start is sure");
        consume(&dir).unwrap();
        assert!(!path.exists(), "used once");
        assert!(open(&dir, false).unwrap().is_none());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_version_1_snapshot_is_read_with_its_epoch_as_the_seed() {
        let dir = temp_dir("version1");
        let path = save(&dir, &kept(), &restored()).unwrap();
        let whole = fs::read_to_string(&path).unwrap();
        assert!(whole.starts_with(r#"{"drops":[[5,2]],"epoch":"epoch001","format""#));
        let old = whole.replacen(r#"{"drops":[[5,2]],"#, "{", 1);
        fs::write(&path, old.replacen(r#""version":2"#, r#""version":1"#, 1)).unwrap();
        let loaded = open(&dir, false).unwrap().expect("a snapshot");
        let epochs = loaded.epochs.export();
        assert_eq!((&*epochs.seed, epochs.drops.len()), ("epoch001", 0));
        assert_eq!(loaded.streams, restored());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_damaged_snapshot_is_refused_and_kept_or_moved_aside() {
        let dir = temp_dir("damaged");
        let path = save(&dir, &kept(), &restored()).unwrap();
        let whole = fs::read_to_string(&path).unwrap();
        let damaged = [
            whole[..whole.len() - 30].to_owned(),
            whole.replace(r#""offset":7"#, r#""offset":8"#),
            whole.replace(r#""streams":2"#, r#""streams":3"#),
            whole.replacen("inbox", "outbox", 1),
            whole.replace(r#""payload":"1e999999""#, r#""payload":"1e99999x""#),
            whole.replace(r#""epoch":"k3x9ab12""#, r#""epoch":"k3 x9""#),
            whole.replace("[[5,2]]", "[[4096,2]]"),
            whole.replace(r#""version":2"#, r#""version":3"#),
            String::new(),
        ];
        for text in &damaged {
            fs::write(&path, text).unwrap();
            let error = open(&dir, false).unwrap_err();
            assert!(matches!(error, SnapshotError::Corrupt { .. }), "{error}");
            assert!(error.to_string().contains("--start-fresh"), "{error}");
            assert_eq!(&fs::read_to_string(&path).unwrap(), text, "never discarded");
        }
        assert!(open(&dir, true).unwrap().is_none());
        assert!(!path.exists());
        let aside: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.starts_with("streams.snapshot.unreadable-"))
            .collect();
        assert_eq!(aside.len(), 1, "moved aside, not deleted");
        fs::remove_dir_all(&dir).unwrap();
    }
}
