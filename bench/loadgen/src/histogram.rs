//! A latency histogram with bounded memory and about 1.6% relative error.
//!
//! Values below 128 ns get a bucket each; above that, every power of two is split
//! into 64 buckets (as in HdrHistogram with two significant digits). Recording is
//! an index computation and an increment, cheap enough for every delivery.

/// Buckets per power of two above [`LINEAR`].
const SUB_BUCKETS: u64 = 64;
/// Values below this are counted exactly.
const LINEAR: u64 = 2 * SUB_BUCKETS;
/// Enough buckets for every `u64`.
const BUCKETS: usize = (LINEAR + (64 - 7) * SUB_BUCKETS) as usize;

/// Counts of nanosecond values.
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            total: 0,
        }
    }
}

impl Histogram {
    /// Counts one value.
    pub fn record(&mut self, value: u64) {
        self.counts[index(value)] += 1;
        self.total += 1;
    }

    /// How many values were recorded.
    #[cfg(test)]
    pub fn len(&self) -> u64 {
        self.total
    }

    /// The value at quantile `q` (0 to 1), or `None` when empty. It is the middle
    /// of the bucket the quantile falls in.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                let (low, high) = bounds(i);
                return Some(low + (high - low) / 2);
            }
        }
        None
    }
}

fn index(value: u64) -> usize {
    if value < LINEAR {
        return value as usize;
    }
    let exponent = 63 - u64::from(value.leading_zeros()); // >= 7
    let shift = exponent - 6;
    let mantissa = value >> shift; // 64..=127
    (LINEAR + (exponent - 7) * SUB_BUCKETS + (mantissa - SUB_BUCKETS)) as usize
}

/// The smallest and largest value of bucket `i`.
fn bounds(i: usize) -> (u64, u64) {
    let i = i as u64;
    if i < LINEAR {
        return (i, i);
    }
    let exponent = (i - LINEAR) / SUB_BUCKETS + 7;
    let mantissa = (i - LINEAR) % SUB_BUCKETS + SUB_BUCKETS;
    let shift = exponent - 6;
    let low = mantissa << shift;
    (low, low + ((1u64 << shift) - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_falls_in_its_bucket() {
        for value in (0..5000).chain([1 << 20, 123_456_789, u64::MAX / 3, u64::MAX]) {
            let (low, high) = bounds(index(value));
            assert!(low <= value && value <= high, "{value}: {low}..={high}");
        }
    }

    #[test]
    fn quantiles_are_within_two_percent() {
        let mut h = Histogram::default();
        assert_eq!(h.quantile(0.5), None);
        for v in 1..=100_000u64 {
            h.record(v * 1000);
        }
        let p50 = h.quantile(0.5).unwrap() as f64;
        let p99 = h.quantile(0.99).unwrap() as f64;
        assert!((p50 / 50_000_000.0 - 1.0).abs() < 0.02, "{p50}");
        assert!((p99 / 99_000_000.0 - 1.0).abs() < 0.02, "{p99}");
        assert_eq!(h.len(), 100_000);
    }
}
