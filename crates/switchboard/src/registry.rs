//! Live connections by client id, and the [`Broker`] interface for delivery.
//!
//! One client id may have many connections (tabs, devices). [`Registry`] keeps
//! them in a sharded map; [`Registration`] removes its entry when dropped, so a
//! connection leaves the registry however it ends: close, TCP drop, timeout or
//! handler panic, because the handler (and the registration it holds) is dropped
//! when its task ends. Handlers and services talk to the [`Broker`] trait, so a
//! backend spanning several nodes can replace the local one without them changing.

use std::sync::Arc;

use smallvec::SmallVec;
use switchboard_proto::PreparedMessage;

use crate::handle::{ConnId, Outbound, Outbox};
use crate::sharded::ShardedMap;

/// A client's id: one user, any number of connections.
pub type ClientId = Arc<str>;

/// The wire format a connection speaks, as the application numbers them (for
/// example plain payloads and an envelope subprotocol). A message is rendered at
/// most once per format, however many connections share it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Format(pub u8);

/// Where messages for client ids go.
pub trait Broker: Send + Sync + 'static {
    /// Records a live connection of `id` that speaks `format`. Dropping the result removes it.
    fn register(&self, id: ClientId, outbox: Outbox, format: Format) -> Registration;

    /// Queues a message on every live connection of `id`, rendered by `render`
    /// for the connection's format; returns how many connections took it.
    fn push(&self, id: &str, render: &dyn Fn(Format) -> PreparedMessage) -> usize;

    /// How many live connections `id` has.
    fn connections(&self, id: &str) -> usize;
}

/// One registered connection: where to push, and in which format.
type Entry = (Outbox, Format);

/// Keeps a connection registered; dropping it unregisters.
#[must_use = "the connection is unregistered as soon as this is dropped"]
pub struct Registration {
    unregister: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl Registration {
    /// A registration that runs `unregister` when dropped.
    pub fn new(unregister: impl FnOnce() + Send + Sync + 'static) -> Self {
        Self {
            unregister: Some(Box::new(unregister)),
        }
    }
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Registration")
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(unregister) = self.unregister.take() {
            unregister();
        }
    }
}

/// The in-process [`Broker`]: client ids to their live connections.
///
/// # Examples
///
/// ```
/// use switchboard::testing::Harness;
/// use switchboard::{Broker, Context, Format, Handler, Message, Outcome, PreparedMessage, Registry};
///
/// struct Quiet;
/// impl Handler for Quiet {
///     type Info = ();
///     fn handle_in(&mut self, _m: Message, _ctx: &mut Context<'_, ()>) -> Outcome {
///         Outcome::Continue
///     }
/// }
///
/// let registry = Registry::new();
/// let mut harness = Harness::new(Quiet);
/// let registration = registry.register("ada".into(), harness.handle().outbox(), Format::default());
/// let hello = PreparedMessage::text("hello");
/// assert_eq!(registry.push("ada", &|_| hello.clone()), 1);
/// harness.deliver_infos();
/// assert_eq!(harness.take_pushed(), vec![Message::text("hello")]);
/// drop(registration);
/// assert_eq!(registry.push("ada", &|_| hello.clone()), 0);
/// ```
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    clients: ShardedMap<Entries>,
}

/// An id's connections. Most ids have one, kept in the map's own slot (32
/// bytes where a `Vec` takes 24 and an allocation of 32 more); a second one
/// moves the list to the heap.
type Entries = SmallVec<[Entry; 1]>;

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("clients", &self.clients())
            .finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                clients: ShardedMap::new(),
            }),
        }
    }

    /// The live connections of `id`.
    pub fn lookup(&self, id: &str) -> Vec<Outbox> {
        let shard = self.inner.clients.read(id);
        let list = shard.get(id).map(Entries::as_slice).unwrap_or_default();
        list.iter().map(|(outbox, _)| outbox.clone()).collect()
    }

    /// How many client ids have at least one connection.
    pub fn clients(&self) -> usize {
        self.inner.clients.len()
    }

    fn remove(&self, id: &str, conn: ConnId) {
        let mut shard = self.inner.clients.write(id);
        if let Some(list) = shard.get_mut(id) {
            list.retain(|(outbox, _)| outbox.id() != conn);
            if list.is_empty() {
                shard.remove(id);
            }
        }
    }
}

impl Broker for Registry {
    fn register(&self, id: ClientId, outbox: Outbox, format: Format) -> Registration {
        let conn = outbox.id();
        let mut shard = self.inner.clients.write(&id);
        shard.entry(id.clone()).or_default().push((outbox, format));
        drop(shard);
        let registry = self.clone();
        Registration::new(move || registry.remove(&id, conn))
    }

    fn push(&self, id: &str, render: &dyn Fn(Format) -> PreparedMessage) -> usize {
        // Pushes can write to sockets (direct writes), so they happen after the
        // shard's lock is released, as in `PubSub::publish`: registering and
        // unregistering on this shard never waits for a socket write. A client
        // id usually has one connection: that one is copied out without a list.
        let (only, several): (Option<Entry>, Vec<Entry>) = {
            let shard = self.inner.clients.read(id);
            match shard.get(id).map(Entries::as_slice) {
                None => return 0,
                Some([one]) => (Some(one.clone()), Vec::new()),
                Some(list) => (None, list.to_vec()),
            }
        };
        only.iter()
            .chain(&several)
            .filter(|(outbox, format)| outbox.push(Outbound::Prepared(render(*format))).is_ok())
            .count()
    }

    fn connections(&self, id: &str) -> usize {
        self.inner.clients.read(id).get(id).map_or(0, Entries::len)
    }
}
