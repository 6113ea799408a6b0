//! The targets of a relay message, chosen at random but reproducibly.
//!
//! The sender picks K distinct client ids from `1..=n`, never itself, from a
//! stream seeded by (sender, sequence number). A receiver recomputes the same
//! list to check that it really was a target: a misrouted delivery counts as
//! corrupted, without listing the targets inside the payload.

use crate::rng::Rng;

/// How a relay scenario picks targets.
#[derive(Debug, Clone, Copy)]
pub struct Picker {
    /// Client ids are `1..=clients`.
    pub clients: u32,
    /// Targets per message.
    pub per_message: usize,
}

impl Picker {
    /// Whether `per_message` distinct targets other than the sender can be drawn
    /// quickly: at most half the other clients, so rejection sampling stays short.
    pub fn is_valid(&self) -> bool {
        self.per_message >= 1 && (self.per_message as u64) * 2 < u64::from(self.clients)
    }

    /// Writes the targets of message `seq` from `from` into `out`.
    pub fn pick(&self, from: u32, seq: u32, out: &mut Vec<u32>) {
        out.clear();
        let mut rng = Rng::new((u64::from(from) << 32) | u64::from(seq));
        while out.len() < self.per_message {
            let id = 1 + rng.below(u64::from(self.clients)) as u32;
            if id != from && !out.contains(&id) {
                out.push(id);
            }
        }
    }

    /// Whether `id` is a target of message `seq` from `from`. `scratch` is reused.
    pub fn is_target(&self, from: u32, seq: u32, id: u32, scratch: &mut Vec<u32>) -> bool {
        self.pick(from, seq, scratch);
        scratch.contains(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_distinct_targets_other_than_the_sender_the_same_way_twice() {
        let picker = Picker {
            clients: 21,
            per_message: 10,
        };
        assert!(picker.is_valid());
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for seq in 1..200 {
            picker.pick(3, seq, &mut a);
            picker.pick(3, seq, &mut b);
            assert_eq!(a, b);
            assert_eq!(a.len(), 10);
            assert!(a.iter().all(|&id| (1..=21).contains(&id) && id != 3));
            let mut sorted = a.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), 10);
        }
        assert!(
            !Picker {
                clients: 10,
                per_message: 5
            }
            .is_valid()
        );
    }
}
