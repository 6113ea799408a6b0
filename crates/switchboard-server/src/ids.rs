//! Client ids: what `?id=` and `"targets"` name.
//!
//! An id is 1-128 characters from `A-Z a-z 0-9 . _ ~ : @ -`: safe in URLs, logs
//! and JSON without escaping. JSON integers are accepted where ids are expected
//! and mean their decimal form, so the seed's `?id=1` and `"targets":[2,3]` work.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde_json::value::RawValue;
use smallvec::SmallVec;
use switchboard::ClientId;

/// Longest id, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// A message's targets, each once, in order: most messages name one or a
/// few, kept on the stack (every message's list is checked for repeats).
pub type Targets<'t> = SmallVec<[&'t str; 4]>;

/// Targets a [`TargetList`] holds inline. Few: the parsed message that holds
/// it is moved several times on its way out of the parser, and a long inline
/// array would be copied each time (16 of them cost more than the allocation
/// they save).
const LISTED_INLINE: usize = 2;
/// Room made at once when a list outgrows its inline room, rather than
/// doubling from 2.
const LISTED_SPILL: usize = 16;

/// Why a string is not a client id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ids are 1-{MAX_ID_LEN} characters of A-Z a-z 0-9 . _ ~ : @ -")]
pub struct InvalidId;

/// Checks `id` and makes it a [`ClientId`].
pub fn parse(id: &str) -> Result<ClientId, InvalidId> {
    if is_valid(id) {
        Ok(ClientId::from(id))
    } else {
        Err(InvalidId)
    }
}

/// Whether `id` is a valid client id.
pub fn is_valid(id: &str) -> bool {
    is_url_safe(id, MAX_ID_LEN, b"")
}

/// Whether `name` is 1 to `max_len` bytes of `A-Z a-z 0-9 . _ ~ : @ -` and
/// `also`: the characters that need no escaping in URLs, logs and JSON. Ids
/// and topic names follow this rule.
pub fn is_url_safe(name: &str, max_len: usize, also: &[u8]) -> bool {
    (1..=max_len).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._~:@-".contains(&b) || also.contains(&b))
}

/// A target as written in JSON: a valid id string or an integer. Invalid ids
/// are kept (as `Err`, as the client wrote them) so that the sender learns
/// which target was wrong. Read only from `serde_json`, whose raw text it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target(pub Result<String, String>);

impl<'de> serde::Deserialize<'de> for Target {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(deserializer)?;
        let target = read_target(raw.get()).map_err(de::Error::custom)?;
        Ok(Target(target.map(Cow::into_owned)))
    }
}

impl Target {
    /// The id, or the invalid value as written.
    pub fn as_result(&self) -> Result<&str, &str> {
        self.0.as_deref().map_err(String::as_str)
    }
}

/// A list of targets in a client's message, read without an allocation per
/// target: integers and strings that are valid ids as written are borrowed
/// from the message; anything else is read as a [`Target`]. Only for
/// `serde_json`, whose raw values this borrows.
#[derive(Debug, Default)]
pub struct TargetList<'a>(SmallVec<[Result<Cow<'a, str>, String>; LISTED_INLINE]>);

impl TargetList<'_> {
    /// How many targets the list names, repeats included.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Each target: the id, or the invalid value as written.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = Result<&str, &str>> {
        self.0.iter().map(|t| t.as_deref().map_err(String::as_str))
    }
}

impl<'de: 'a, 'a> serde::Deserialize<'de> for TargetList<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Made for the list's own lifetime, not the input's: a `SmallVec`
        // cannot be shortened afterwards, as a `Vec` could.
        struct ListVisitor<'a>(PhantomData<&'a str>);

        impl<'de: 'a, 'a> Visitor<'de> for ListVisitor<'a> {
            type Value = TargetList<'a>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of client ids")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut list = SmallVec::new();
                while let Some(raw) = seq.next_element::<&'de RawValue>()? {
                    if list.len() == LISTED_INLINE && !list.spilled() {
                        list.reserve_exact(LISTED_SPILL - LISTED_INLINE);
                    }
                    list.push(read_target(raw.get()).map_err(de::Error::custom)?);
                }
                Ok(TargetList(list))
            }
        }

        deserializer.deserialize_seq(ListVisitor(PhantomData))
    }
}

/// One target from its JSON text (a valid JSON value): the id, or the
/// invalid value as the client sent it (a string decoded, anything else as
/// written: numbers never pass through a float, which would change them).
fn read_target(json: &str) -> Result<Result<Cow<'_, str>, String>, serde_json::Error> {
    if let Some(integer) = integer_text(json) {
        return Ok(if is_valid(integer) {
            Ok(Cow::Borrowed(integer))
        } else {
            Err(json.to_owned())
        });
    }
    match json.as_bytes()[0] {
        b'"' => {
            // A valid id has no character JSON escapes, so its text is its value.
            let text = &json[1..json.len() - 1];
            if is_valid(text) {
                return Ok(Ok(Cow::Borrowed(text)));
            }
            let value: String = serde_json::from_str(json)?;
            Ok(if is_valid(&value) {
                Ok(Cow::Owned(value))
            } else {
                Err(value)
            })
        }
        b'[' => Err(de::Error::invalid_type(de::Unexpected::Seq, &EXPECTED)),
        b'{' => Err(de::Error::invalid_type(de::Unexpected::Map, &EXPECTED)),
        // Other numbers, booleans, null.
        _ => Ok(Err(json.to_owned())),
    }
}

const EXPECTED: &str = "a client id (string or integer)";

/// The id a JSON number means, when it is an integer: its digits as written.
/// A zero fraction is allowed (`2.0` is the integer 2 to JSON Schema); an
/// exponent is not.
fn integer_text(json: &str) -> Option<&str> {
    // A byte scan: `split_once` sets up a searcher that costs more than the
    // few digits of an id (5% of the instructions of a delivery by targets).
    let (integer, fraction) = match json.bytes().position(|b| b == b'.') {
        Some(dot) => (&json[..dot], Some(&json[dot + 1..])),
        None => (json, None),
    };
    let digits = integer.strip_prefix('-').unwrap_or(integer);
    let is_integer = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
    let zero_fraction = fraction.is_none_or(|f| !f.is_empty() && f.bytes().all(|b| b == b'0'));
    (is_integer && zero_fraction).then_some(integer)
}

/// The valid ids of `targets`, each once, in order; or the first invalid one.
pub fn unique<'t>(
    targets: impl ExactSizeIterator<Item = Result<&'t str, &'t str>>,
) -> Result<Targets<'t>, &'t str> {
    // Most messages name a few targets: a linear scan beats hashing them, and
    // saves the set's allocation on the hot path. Long lists use a set, with
    // foldhash rather than SipHash (far fewer instructions for short ids): the
    // set lives for one message and is seeded afresh, so no client can learn
    // the seed and choose ids that collide, as it might for a long-lived map.
    const SCAN_UP_TO: usize = 16;
    let mut seen =
        (targets.len() > SCAN_UP_TO).then(|| hashbrown::HashSet::with_capacity(targets.len()));
    let mut ids = Targets::with_capacity(targets.len());
    for target in targets {
        let id = target?;
        let new = match &mut seen {
            Some(seen) => seen.insert(id),
            None => !ids.contains(&id),
        };
        if new {
            ids.push(id);
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_safe_ids_and_refuses_the_rest() {
        for id in ["1", "alice", "user:42", "a.b_c~d@e-f", &"x".repeat(128)] {
            assert!(is_valid(id), "{id}");
        }
        for id in ["", " ", "a b", "a/b", "é", "a\"b", &"x".repeat(129)] {
            assert!(!is_valid(id), "{id}");
        }
    }

    #[test]
    fn unique_keeps_the_first_of_each_and_names_the_first_invalid() {
        let targets: Vec<Target> = serde_json::from_str(r#"[2, "2", "b", 2, "b"]"#).unwrap();
        assert_eq!(
            unique(targets.iter().map(Target::as_result)).as_deref(),
            Ok(&["2", "b"][..])
        );
        let targets: Vec<Target> = serde_json::from_str(r#"["a", "x y", null]"#).unwrap();
        assert_eq!(unique(targets.iter().map(Target::as_result)), Err("x y"));
        // Past the linear-scan size, the set path gives the same answer.
        let many: Vec<Target> = (0..40).map(|i| Target(Ok((i % 20).to_string()))).collect();
        let expected: Vec<String> = (0..20).map(|i: i32| i.to_string()).collect();
        assert_eq!(
            unique(many.iter().map(Target::as_result)).unwrap()[..],
            expected
        );
    }

    #[test]
    fn integers_mean_their_digits_as_written() {
        let json = r#"[2, -4, 2.0, 2.000, 9007199254740993.0, 18446744073709551616, "3"]"#;
        let targets: Vec<Target> = serde_json::from_str(json).unwrap();
        let ids: Vec<_> = targets.iter().map(|t| t.0.clone().unwrap()).collect();
        assert_eq!(
            ids,
            [
                "2",
                "-4",
                "2",
                "2",
                "9007199254740993",
                "18446744073709551616",
                "3"
            ]
        );
    }

    #[test]
    fn invalid_targets_are_quoted_as_sent() {
        let json = r#"[1.5, 1e2, 9007199254740993.5, 1e999999, true, null, "bad id", "\u0041 b"]"#;
        let targets: Vec<Target> = serde_json::from_str(json).unwrap();
        let invalid: Vec<_> = targets.iter().map(|t| t.0.clone().unwrap_err()).collect();
        assert_eq!(
            invalid,
            [
                "1.5",
                "1e2",
                "9007199254740993.5",
                "1e999999",
                "true",
                "null",
                "bad id",
                "A b"
            ]
        );
    }

    #[test]
    fn a_target_list_reads_like_targets_and_borrows_the_usual_ones() {
        let json = r#"[2, "3", -4, "bad id", 1.5, null, 2.0, "\u0041", 18446744073709551616, "é"]"#;
        let general: Vec<Target> = serde_json::from_str(json).unwrap();
        let list: TargetList<'_> = serde_json::from_str(json).unwrap();
        assert_eq!(list.len(), general.len());
        for (fast, slow) in list.iter().zip(&general) {
            assert_eq!(fast, slow.as_result(), "{json}");
        }
        let borrowed: Vec<bool> = list
            .0
            .iter()
            .map(|t| matches!(t, Ok(Cow::Borrowed(_))))
            .collect();
        assert_eq!(
            borrowed[..3],
            [true, true, true],
            "integers and plain ids are borrowed"
        );
    }

    #[test]
    fn a_target_list_refuses_what_targets_refuse() {
        for json in [
            r#"[[1]]"#,
            r#"[1, [2]]"#,
            r#"[{"a":1}]"#,
            r#""2""#,
            "2",
            "{}",
            "true",
        ] {
            assert!(
                serde_json::from_str::<TargetList<'_>>(json).is_err(),
                "{json}"
            );
            assert!(serde_json::from_str::<Vec<Target>>(json).is_err(), "{json}");
        }
    }

    /// The text of one JSON scalar, of every kind a client might put in a list
    /// of targets: integers of any size and sign, floats, ids, strings with
    /// escapes or characters ids may not have, booleans and null.
    fn scalar() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            "[1-9][0-9]{0,24}",
            any::<f64>()
                .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
                .prop_map(|f| serde_json::to_string(&f).unwrap()),
            "(0|[1-9][0-9]{0,2})\\.[0-9]{1,3}(e[+-]?[0-9]{1,2})?",
            "[A-Za-z0-9._~:@-]{0,130}".prop_map(|id| format!("\"{id}\"")),
            any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
            "[a-z]{0,3}".prop_map(|s| format!("\"\\u0041{s}\"")),
            Just("true".to_owned()),
            Just("null".to_owned()),
        ]
    }

    proptest::proptest! {
        /// Every scalar reads as a valid id or as the value the client sent:
        /// an integer's digits, a string decoded, anything else as written.
        #[test]
        fn every_target_is_a_valid_id_or_the_value_sent(item in scalar()) {
            let target: Target = serde_json::from_str(&item).unwrap();
            let decoded: Option<String> = serde_json::from_str(&item).ok();
            match (&target.0, decoded) {
                (Ok(id), Some(string)) => proptest::prop_assert_eq!(id, &string),
                (Ok(id), None) => {
                    proptest::prop_assert!(is_valid(id));
                    let as_written = item.split('.').next().unwrap();
                    proptest::prop_assert_eq!(id.as_str(), as_written);
                    proptest::prop_assert!(item[as_written.len()..].bytes().all(|b| b == b'.' || b == b'0'));
                }
                (Err(value), Some(string)) => {
                    proptest::prop_assert!(!is_valid(&string));
                    proptest::prop_assert_eq!(value, &string);
                }
                (Err(value), None) => proptest::prop_assert_eq!(value, &item),
            }
        }

        /// The borrowing list reads every list as single targets do.
        #[test]
        fn a_target_list_reads_every_list_like_targets(
            items in proptest::collection::vec(scalar(), 0..24),
            space in "[ \t\n\r]{0,2}",
        ) {
            let json = format!("[{space}{}{space}]", items.join(&format!("{space},{space}")));
            let general: Vec<Target> = serde_json::from_str(&json).unwrap();
            let list: TargetList<'_> = serde_json::from_str(&json).unwrap();
            proptest::prop_assert_eq!(list.len(), general.len());
            for (fast, slow) in list.iter().zip(&general) {
                proptest::prop_assert_eq!(fast, slow.as_result(), "{}", json);
            }
        }
    }
}
