//! Topic names and namespaces.
//!
//! A namespace is a topic prefix with a policy: whether clients may publish or
//! only the server, whether presence (queries and join/leave events) is on, and
//! how many subscribers a topic may have. The longest matching prefix wins. With
//! no namespaces configured, one catch-all namespace applies (prefix `""`).

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchboard::{ClientId, PresenceChange, PresenceListener, PubSub};

use crate::errors::ErrorCode;
use crate::streams::Retention;
use crate::wire;

/// Longest topic name, in bytes.
pub const MAX_TOPIC_LEN: usize = 200;

/// The topic of client ids going online (their first connection anywhere)
/// and offline (their last), in cluster mode: the server publishes
/// `{"client":ID,"event":"online"|"offline"}` there; clients may subscribe
/// (with history, to resume) but not publish.
pub const CLIENT_EVENTS: &str = "$clients";

/// How long `$clients` keeps an event.
pub const CLIENT_EVENTS_TTL: Duration = Duration::from_secs(3600);

/// Why a string is not a topic name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("topics are 1-{MAX_TOPIC_LEN} characters of A-Z a-z 0-9 . _ ~ : @ / -")]
pub struct InvalidTopic;

/// Checks a topic name: an id's characters, and `/`.
pub fn validate(topic: &str) -> Result<(), InvalidTopic> {
    if crate::ids::is_url_safe(topic, MAX_TOPIC_LEN, b"/") {
        Ok(())
    } else {
        Err(InvalidTopic)
    }
}

/// The policy of the topics that share a prefix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Namespace {
    /// Topics starting with this belong here (`"chat:"`); `""` matches every topic.
    pub prefix: String,
    /// Clients may publish; when false only the server API may.
    #[serde(default = "yes")]
    pub client_publish: bool,
    /// Presence queries and join/leave events.
    #[serde(default)]
    pub presence: bool,
    /// Most subscribed connections per topic.
    #[serde(default)]
    pub max_subscribers: Option<usize>,
    /// Messages each topic keeps, for subscribers to resume from; 0 keeps none.
    #[serde(default)]
    pub history_size: usize,
    /// How long a topic keeps a message, in seconds.
    #[serde(default = "five_minutes")]
    pub history_ttl_secs: u64,
}

fn yes() -> bool {
    true
}

fn five_minutes() -> u64 {
    300
}

impl Namespace {
    /// What its topics keep, when they keep history.
    pub fn history(&self) -> Option<Retention> {
        (self.history_size > 0).then(|| Retention {
            max_entries: self.history_size,
            ttl: Duration::from_secs(self.history_ttl_secs),
        })
    }
}

impl Default for Namespace {
    fn default() -> Self {
        Self {
            prefix: String::new(),
            client_publish: true,
            presence: false,
            max_subscribers: Some(100_000),
            history_size: 0,
            history_ttl_secs: five_minutes(),
        }
    }
}

/// The configured namespaces, longest prefix first, and `$clients`'s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespaces {
    list: Vec<Namespace>,
    /// `$clients`, when client events are on.
    client_events: Option<Namespace>,
}

impl Namespaces {
    /// These namespaces, or the catch-all default when `list` is empty.
    pub fn new(mut list: Vec<Namespace>) -> Self {
        if list.is_empty() {
            list.push(Namespace::default());
        }
        list.sort_by_key(|ns| std::cmp::Reverse(ns.prefix.len()));
        Self {
            list,
            client_events: None,
        }
    }

    /// With the `$clients` topic, keeping `size` events.
    pub fn with_client_events(mut self, size: usize) -> Self {
        self.client_events = (size > 0).then(|| Namespace {
            prefix: CLIENT_EVENTS.into(),
            client_publish: false,
            presence: false,
            history_size: size,
            history_ttl_secs: CLIENT_EVENTS_TTL.as_secs(),
            ..Namespace::default()
        });
        self
    }

    /// The longest time any namespace keeps history (zero when none does).
    pub fn longest_history_ttl(&self) -> Duration {
        self.list
            .iter()
            .chain(&self.client_events)
            .filter_map(Namespace::history)
            .map(|retention| retention.ttl)
            .max()
            .unwrap_or_default()
    }

    /// The namespace of `topic`, if any matches.
    pub fn find(&self, topic: &str) -> Option<&Namespace> {
        if topic == CLIENT_EVENTS {
            return self.client_events.as_ref();
        }
        self.list.iter().find(|ns| topic.starts_with(&ns.prefix))
    }

    /// Checks `topic`'s name and finds its namespace: the one rule for the
    /// WebSocket protocol and the HTTP API alike.
    pub fn check(&self, topic: &str) -> Result<&Namespace, (ErrorCode, String)> {
        if let (CLIENT_EVENTS, Some(events)) = (topic, &self.client_events) {
            return Ok(events);
        }
        validate(topic).map_err(|e| {
            (
                ErrorCode::InvalidTopic,
                format!("invalid topic {topic:?}: {e}"),
            )
        })?;
        self.find(topic).ok_or_else(|| {
            (
                ErrorCode::UnknownNamespace,
                format!("no namespace serves {topic:?}"),
            )
        })
    }
}

/// Publishes join and leave events to topics whose namespace has presence on.
pub struct PresenceEvents(pub Arc<Namespaces>);

impl PresenceListener for PresenceEvents {
    fn changed(&self, pubsub: &PubSub, topic: &str, client: &ClientId, change: PresenceChange) {
        let event = wire::presence_event(topic, client, change);
        pubsub.publish(topic, &|_| event.clone());
    }

    /// Only namespaces with presence have events.
    fn wants(&self, topic: &str) -> bool {
        self.0.find(topic).is_some_and(|ns| ns.presence)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        for ok in ["chat:lobby", "news/eu-west", "a", &"t".repeat(200)] {
            assert!(validate(ok).is_ok(), "{ok}");
        }
        for bad in ["", "has space", "ünï", "a*b", &"t".repeat(201)] {
            assert!(validate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn longest_prefix_wins_and_unmatched_topics_have_none() {
        let namespaces = Namespaces::new(vec![
            Namespace {
                prefix: "chat:".into(),
                ..Namespace::default()
            },
            Namespace {
                prefix: "chat:ops:".into(),
                client_publish: false,
                ..Namespace::default()
            },
        ]);
        assert!(namespaces.find("chat:lobby").unwrap().client_publish);
        assert!(!namespaces.find("chat:ops:alerts").unwrap().client_publish);
        assert!(namespaces.find("news:x").is_none());
        assert_eq!(Namespaces::new(vec![]).find("anything").unwrap().prefix, "");
    }
}
