//! Client ids: what `?id=` and `"targets"` name.
//!
//! An id is 1-128 characters from `A-Z a-z 0-9 . _ ~ : @ -`: safe in URLs, logs
//! and JSON without escaping. JSON integers are accepted where ids are expected
//! and mean their decimal form, so the seed's `?id=1` and `"targets":[2,3]` work.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde_json::value::RawValue;
use switchboard::ClientId;

/// Longest id, in bytes.
pub const MAX_ID_LEN: usize = 128;

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
/// are kept (as `Err`) so that the sender learns which target was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target(pub Result<String, String>);

impl<'de> serde::Deserialize<'de> for Target {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TargetVisitor;

        impl Visitor<'_> for TargetVisitor {
            type Value = Target;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a client id (string or integer)")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Target, E> {
                Ok(Target(if is_valid(v) {
                    Ok(v.to_owned())
                } else {
                    Err(v.to_owned())
                }))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Target, E> {
                Ok(Target(Ok(v.to_string())))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Target, E> {
                Ok(Target(Ok(v.to_string())))
            }

            /// `2.0` is the integer 2 to JSON Schema, so it is the id `"2"` here too.
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Target, E> {
                const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53: larger floats are not exact
                if v.fract() == 0.0 && v.abs() <= EXACT {
                    Ok(Target(Ok((v as i64).to_string())))
                } else {
                    Ok(Target(Err(v.to_string())))
                }
            }

            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Target, E> {
                Ok(Target(Err(v.to_string())))
            }

            fn visit_unit<E: de::Error>(self) -> Result<Target, E> {
                Ok(Target(Err("null".into())))
            }
        }

        deserializer.deserialize_any(TargetVisitor)
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
pub struct TargetList<'a>(Vec<Result<Cow<'a, str>, String>>);

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
        struct ListVisitor;

        impl<'de> Visitor<'de> for ListVisitor {
            type Value = TargetList<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of client ids")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut list = Vec::with_capacity(seq.size_hint().unwrap_or(1).min(64));
                while let Some(raw) = seq.next_element::<&'de RawValue>()? {
                    list.push(read_target(raw.get()).map_err(de::Error::custom)?);
                }
                Ok(TargetList(list))
            }
        }

        deserializer.deserialize_seq(ListVisitor)
    }
}

/// One target from its JSON text (a valid JSON value).
fn read_target(json: &str) -> Result<Result<Cow<'_, str>, String>, serde_json::Error> {
    // Plain decimal digits are the id itself (19 of them always fit a u64).
    if (1..=19).contains(&json.len()) && json.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(Ok(Cow::Borrowed(json)));
    }
    // A valid id has no character JSON escapes, so its text is its value.
    if let Some(text) = json.strip_prefix('"').and_then(|s| s.strip_suffix('"'))
        && is_valid(text)
    {
        return Ok(Ok(Cow::Borrowed(text)));
    }
    let target: Target = serde_json::from_str(json)?;
    Ok(target.0.map(Cow::Owned))
}

/// The valid ids of `targets`, each once, in order; or the first invalid one.
pub fn unique<'t>(
    targets: impl ExactSizeIterator<Item = Result<&'t str, &'t str>>,
) -> Result<Vec<&'t str>, &'t str> {
    // Most messages name a few targets: a linear scan beats hashing them, and
    // saves the set's allocation on the hot path. Long lists use a set.
    const SCAN_UP_TO: usize = 16;
    let mut seen = (targets.len() > SCAN_UP_TO)
        .then(|| std::collections::HashSet::with_capacity(targets.len()));
    let mut ids: Vec<&str> = Vec::with_capacity(targets.len());
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
            unique(targets.iter().map(Target::as_result)),
            Ok(vec!["2", "b"])
        );
        let targets: Vec<Target> = serde_json::from_str(r#"["a", "x y", null]"#).unwrap();
        assert_eq!(unique(targets.iter().map(Target::as_result)), Err("x y"));
        // Past the linear-scan size, the set path gives the same answer.
        let many: Vec<Target> = (0..40).map(|i| Target(Ok((i % 20).to_string()))).collect();
        let expected: Vec<String> = (0..20).map(|i: i32| i.to_string()).collect();
        assert_eq!(
            unique(many.iter().map(Target::as_result)).unwrap(),
            expected
        );
    }

    #[test]
    fn integers_mean_their_decimal_form() {
        let targets: Vec<Target> =
            serde_json::from_str(r#"[2, "3", -4, "bad id", 1.5, null]"#).unwrap();
        let ok: Vec<_> = targets.iter().map(|t| t.0.is_ok()).collect();
        assert_eq!(ok, [true, true, true, false, false, false]);
        assert_eq!(targets[0].0, Ok("2".into()));
        assert_eq!(targets[2].0, Ok("-4".into()));
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
            [true, true, false],
            "integers and plain ids are borrowed"
        );
    }

    #[test]
    fn a_target_list_refuses_what_targets_refuse() {
        for json in [r#"[[1]]"#, r#"[{"a":1}]"#, r#""2""#, "2"] {
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
        /// The borrowing fast path must read every list exactly as the general
        /// [`Target`] does: the same ids, the same invalid values.
        #[test]
        fn a_target_list_reads_every_list_like_targets(
            items in proptest::collection::vec(scalar(), 0..12)
        ) {
            let json = format!("[{}]", items.join(", "));
            let general: Vec<Target> = serde_json::from_str(&json).unwrap();
            let list: TargetList<'_> = serde_json::from_str(&json).unwrap();
            proptest::prop_assert_eq!(list.len(), general.len());
            for (fast, slow) in list.iter().zip(&general) {
                proptest::prop_assert_eq!(fast, slow.as_result(), "{}", json);
            }
        }
    }
}
