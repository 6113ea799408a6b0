//! Runs summarised per scenario and server: [`group`] collects each server's
//! repetitions of a scenario into a [`Cell`], whose figures are medians.

use crate::record::{HELD, Record};

/// The median of `values`, or `None` when there are none.
pub fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

/// The runs of one server in one scenario.
#[derive(Debug)]
pub struct Cell<'a> {
    /// Scenario name.
    pub scenario: &'a str,
    /// Server name.
    pub server: &'a str,
    /// Its repetitions.
    pub runs: Vec<&'a Record>,
}

impl Cell<'_> {
    /// The median of a figure over the runs that have it.
    pub fn median(&self, figure: impl Fn(&Record) -> Option<f64>) -> Option<f64> {
        median(self.values(figure))
    }

    /// A figure of every run that has it.
    pub fn values(&self, figure: impl Fn(&Record) -> Option<f64>) -> Vec<f64> {
        self.runs.iter().filter_map(|r| figure(r)).collect()
    }

    /// The total of a count over the runs.
    pub fn sum(&self, figure: impl Fn(&Record) -> u64) -> u64 {
        self.runs.iter().map(|r| figure(r)).sum()
    }

    /// Whether the load generator may have been the bottleneck in any run.
    pub fn loadgen_bound(&self) -> bool {
        self.runs.iter().any(|r| r.loadgen_bound)
    }

    /// What one operation is.
    pub fn unit(&self) -> &str {
        self.runs.first().map_or("op", |r| r.unit.as_str())
    }

    /// Whether the scenario holds connections rather than moving messages.
    pub fn held_connections(&self) -> bool {
        self.unit() == HELD
    }
}

/// Groups records by scenario and server, both in order of first appearance,
/// with the baseline server first. The caller leaves out the runs not to count.
pub fn group<'a>(records: &[&'a Record], baseline: &str) -> Vec<Vec<Cell<'a>>> {
    let mut scenarios: Vec<&'a str> = Vec::new();
    let mut servers: Vec<&'a str> = Vec::new();
    for &r in records {
        if !scenarios.contains(&r.scenario.as_str()) {
            scenarios.push(&r.scenario);
        }
        if !servers.contains(&r.server.as_str()) {
            servers.push(&r.server);
        }
    }
    servers.sort_by_key(|s| *s != baseline);
    scenarios
        .iter()
        .map(|scenario| {
            servers
                .iter()
                .map(|server| Cell {
                    scenario,
                    server,
                    runs: records
                        .iter()
                        .copied()
                        .filter(|r| r.scenario == *scenario && r.server == *server)
                        .collect(),
                })
                .filter(|cell| !cell.runs.is_empty())
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }
}
