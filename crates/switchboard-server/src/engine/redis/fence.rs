//! The fence between the link's connections: when the link connects again,
//! Redis first ends the connection the link gave up on. Calls sent on that
//! one may still be on their way (held in a partition, retransmitted once it
//! heals) when their failure has already been acted on: a connect that timed
//! out sends its leave on the new connection, and the leave, finding nothing
//! to undo, would let the late connect count for ever. Once Redis has ended
//! the old connection, nothing sent on it can run.

use redis::RedisResult;
use redis::aio::MultiplexedConnection;

use super::link::{TIMEOUT, timeout_error};

/// A link connection as Redis knows it: both are needed to end it, so that a
/// Redis restarted since (whose ids start again) ends nobody else's.
pub(super) struct Known {
    id: String,
    addr: String,
}

impl Known {
    /// From `CLIENT INFO`'s answer: `id=7 addr=127.0.0.1:5000 ...`.
    fn parse(info: &str) -> Option<Self> {
        let field = |name: &str| {
            info.split_ascii_whitespace()
                .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
                .map(str::to_owned)
        };
        Some(Self {
            id: field("id")?,
            addr: field("addr")?,
        })
    }
}

/// Ends `previous` (the link's last connection) in Redis, then learns how
/// Redis knows `conn`, for the next time. A Redis that refuses either
/// command (an ACL without `CLIENT`) is told once in the log, and the link
/// goes on unfenced: a call delayed past its leave is then possible, as
/// docs/cluster.md says.
pub(super) async fn fence(
    conn: &mut MultiplexedConnection,
    previous: &mut Option<Known>,
    warned: &mut bool,
) -> RedisResult<()> {
    // Kept until the kill is done: a kill that fails (this connection too is
    // lost) is tried again by the next one.
    if let Some(old) = previous.as_ref() {
        let kill = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(&old.id)
            .arg("ADDR")
            .arg(&old.addr)
            .to_owned();
        refused(timed(kill.query_async::<u64>(conn)).await, warned)?;
    }
    *previous = None;
    let info = redis::cmd("CLIENT").arg("INFO").to_owned();
    if let Some(info) = refused(timed(info.query_async::<String>(conn)).await, warned)? {
        *previous = Known::parse(&info);
    }
    Ok(())
}

async fn timed<T>(command: impl Future<Output = RedisResult<T>>) -> RedisResult<T> {
    tokio::time::timeout(TIMEOUT, command)
        .await
        .map_err(|_| timeout_error())?
}

/// A command's answer; `None` if Redis will never run it here (an ACL's
/// `NOPERM`, a command renamed away), which is logged the first time.
/// Another refusal (`BUSY` while a script runs too long, `LOADING`) is an
/// error, as a failed connection is: the link connects again and fences then.
fn refused<T>(answer: RedisResult<T>, warned: &mut bool) -> RedisResult<Option<T>> {
    match answer {
        Ok(value) => Ok(Some(value)),
        Err(e) if matches!(e.code(), Some("NOPERM" | "ERR")) => {
            if !std::mem::replace(warned, true) {
                tracing::warn!(error = %e, "Redis refused CLIENT INFO or CLIENT KILL: the link cannot end a connection it gave up on, so a call delayed on it may run after the calls that follow it");
            }
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::Known;

    #[test]
    fn client_info_gives_the_id_and_the_address() {
        let known = Known::parse(
            "id=12 addr=127.0.0.1:50412 laddr=127.0.0.1:6379 fd=9 name= age=0 idle=0\n",
        )
        .unwrap();
        assert_eq!((&*known.id, &*known.addr), ("12", "127.0.0.1:50412"));
        assert!(Known::parse("laddr=127.0.0.1:6379").is_none());
    }
}
