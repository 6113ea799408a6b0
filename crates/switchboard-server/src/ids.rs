//! Client ids: what `?id=` and `"targets"` name.
//!
//! An id is 1-128 characters from `A-Z a-z 0-9 . _ ~ : @ -`: safe in URLs, logs
//! and JSON without escaping. JSON integers are accepted where ids are expected
//! and mean their decimal form, so the seed's `?id=1` and `"targets":[2,3]` work.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
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
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._~:@-".contains(&b))
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

/// The valid ids of `targets`, each once, in order; or the first invalid one.
pub fn unique(targets: &[Target]) -> Result<Vec<&str>, &str> {
    // Most messages name a few targets: a linear scan beats hashing them, and
    // saves the set's allocation on the hot path. Long lists use a set.
    const SCAN_UP_TO: usize = 16;
    let mut seen = (targets.len() > SCAN_UP_TO)
        .then(|| std::collections::HashSet::with_capacity(targets.len()));
    let mut ids: Vec<&str> = Vec::with_capacity(targets.len());
    for target in targets {
        let id = target.0.as_deref().map_err(String::as_str)?;
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
        assert_eq!(unique(&targets), Ok(vec!["2", "b"]));
        let targets: Vec<Target> = serde_json::from_str(r#"["a", "x y", null]"#).unwrap();
        assert_eq!(unique(&targets), Err("x y"));
        // Past the linear-scan size, the set path gives the same answer.
        let many: Vec<Target> = (0..40).map(|i| Target(Ok((i % 20).to_string()))).collect();
        let expected: Vec<String> = (0..20).map(|i: i32| i.to_string()).collect();
        assert_eq!(unique(&many).unwrap(), expected);
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
}
