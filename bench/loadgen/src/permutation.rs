//! Whether the runs of two servers tell them apart: the two-sided Mann–Whitney
//! rank-sum test, as a permutation test. On this shared host one server's figure
//! moves by up to a fifth between repetitions, so a ratio of medians means little
//! without how likely it is when both servers are the same.
//!
//! The statistic is |U − nm/2|, where U counts the pairs (one run of each) in
//! which `a`'s run is the smaller (ties count a half). Under "no difference" every
//! way of splitting the pooled runs into groups of the same sizes is as likely as
//! the split observed; the p-value is the share of splits whose statistic is at
//! least the observed one. With few runs every split is tried; beyond
//! [`EXACT_SPLITS`] a fixed-seed sample of them, so that a report is reproducible.

use crate::rng::Rng;

/// Most splits enumerated one by one (20 for 3 runs against 3; 184,756 for 10
/// against 10 is sampled).
const EXACT_SPLITS: u64 = 50_000;

/// Splits drawn when there are more than [`EXACT_SPLITS`].
const SAMPLED_SPLITS: u64 = 20_000;

/// The p-value of the difference between `a` and `b`, or `None` when either
/// has no runs.
pub fn p_value(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.is_empty() || b.is_empty() {
        return None;
    }
    let observed = statistic(a, b);
    let pooled: Vec<f64> = a.iter().chain(b).copied().collect();
    let at_least = |split: &[f64]| {
        let (left, right) = split.split_at(a.len());
        // Sums of halves: exact in f64, so equal splits compare equal.
        statistic(left, right) >= observed
    };
    let total = choose(pooled.len() as u64, a.len() as u64);
    if total <= EXACT_SPLITS {
        let mut hits = 0u64;
        let mut split = Vec::with_capacity(pooled.len());
        for_each_split(pooled.len(), a.len(), |chosen| {
            split.clear();
            split.extend(chosen.iter().map(|&i| pooled[i]));
            split.extend(
                (0..pooled.len())
                    .filter(|i| !chosen.contains(i))
                    .map(|i| pooled[i]),
            );
            hits += u64::from(at_least(&split));
        });
        Some(hits as f64 / total as f64)
    } else {
        let mut rng = Rng::new(0x5eed);
        let mut split = pooled;
        let hits = (0..SAMPLED_SPLITS)
            .filter(|_| {
                shuffle(&mut split, &mut rng);
                at_least(&split)
            })
            .count() as f64;
        // The observed split counts as one of the sample (a valid p-value is never 0).
        Some((hits + 1.0) / (SAMPLED_SPLITS as f64 + 1.0))
    }
}

/// |U − nm/2|: how far the pairs in which `a` is smaller are from half of all pairs.
fn statistic(a: &[f64], b: &[f64]) -> f64 {
    let smaller: f64 = a
        .iter()
        .flat_map(|x| b.iter().map(move |y| (x, y)))
        .map(|(x, y)| match x.total_cmp(y) {
            std::cmp::Ordering::Less => 1.0,
            std::cmp::Ordering::Equal => 0.5,
            std::cmp::Ordering::Greater => 0.0,
        })
        .sum();
    (smaller - (a.len() * b.len()) as f64 / 2.0).abs()
}

/// n choose k, saturating (only compared against [`EXACT_SPLITS`]).
fn choose(n: u64, k: u64) -> u64 {
    let k = k.min(n - k);
    (0..k).fold(1u64, |acc, i| acc.saturating_mul(n - i) / (i + 1))
}

/// Calls `visit` with every k-subset of `0..n`, in lexicographic order.
fn for_each_split(n: usize, k: usize, mut visit: impl FnMut(&[usize])) {
    let mut chosen: Vec<usize> = (0..k).collect();
    loop {
        visit(&chosen);
        // The rightmost index that can still move right.
        let Some(i) = (0..k).rev().find(|&i| chosen[i] < n - k + i) else {
            return;
        };
        chosen[i] += 1;
        for j in i + 1..k {
            chosen[j] = chosen[j - 1] + 1;
        }
    }
}

/// Fisher–Yates.
fn shuffle(values: &mut [f64], rng: &mut Rng) {
    for i in (1..values.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        values.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_runs_against_three_can_never_go_below_a_tenth() {
        // Completely separated: only the observed split and its mirror are as far.
        assert_eq!(p_value(&[1.0, 1.1, 1.2], &[2.0, 2.1, 2.2]), Some(0.1));
    }

    #[test]
    fn the_same_runs_on_both_sides_are_no_evidence_at_all() {
        assert_eq!(p_value(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]), Some(1.0));
    }

    #[test]
    fn many_separated_runs_are_sampled_and_give_a_small_p() {
        let a: Vec<f64> = (0..12).map(|i| 1.0 + f64::from(i) * 0.01).collect();
        let b: Vec<f64> = (0..12).map(|i| 1.5 + f64::from(i) * 0.01).collect();
        assert!(choose(24, 12) > EXACT_SPLITS, "this case is sampled");
        let p = p_value(&a, &b).unwrap();
        assert!(p < 0.001, "{p}");
        assert_eq!(Some(p), p_value(&a, &b), "the sample is reproducible");
    }

    #[test]
    fn overlapping_runs_give_a_large_p() {
        let p = p_value(&[1.0, 3.0, 5.0, 7.0], &[2.0, 4.0, 6.0, 8.0]).unwrap();
        assert!(p > 0.5, "{p}");
    }

    #[test]
    fn no_runs_is_no_answer() {
        assert_eq!(p_value(&[], &[1.0]), None);
        assert_eq!(p_value(&[1.0], &[]), None);
    }

    #[test]
    fn every_subset_is_visited_once() {
        let mut seen = Vec::new();
        for_each_split(5, 2, |c| seen.push(c.to_vec()));
        assert_eq!(seen.len() as u64, choose(5, 2));
        seen.dedup();
        assert_eq!(seen.len(), 10);
        assert_eq!(seen[0], [0, 1]);
        assert_eq!(seen[9], [3, 4]);
    }
}
