//! The result of one run: what a scenario measured, as one JSON line.

use std::io::Write as _;
use std::path::Path;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::histogram::Histogram;
use crate::measure::WindowFigures;

/// Above this share of one core, the load generator, not the server, may be what
/// limits the run.
pub const LOADGEN_BOUND_UTIL: f64 = 0.9;

/// The unit of scenarios that hold connections rather than move messages: for
/// them a rate or a CPU cost per unit means nothing.
pub const HELD: &str = "connection";

/// What a scenario hands back to be recorded.
#[derive(Debug)]
pub struct Measured {
    /// What one operation is: "echo", "delivery", "connection", "handshake".
    pub unit: &'static str,
    /// The scenario's parameters, for humans.
    pub params: String,
    /// WebSocket connections the scenario held.
    pub connections: u64,
    /// The measured window.
    pub window: WindowFigures,
    /// Operations completed inside the window.
    pub ops: u64,
    /// Messages sent inside the window (the offered load actually achieved).
    pub sent: u64,
    /// Latency of the operations inside the window, if they have one.
    pub latency: Option<Histogram>,
    /// The server's resident memory at the end of the window.
    pub server_rss_bytes: u64,
    /// Server memory per held connection (idle).
    pub rss_per_conn_bytes: Option<f64>,
    /// Operations expected over the whole run.
    pub expected: u64,
    /// Expected but not completed (undelivered messages, failed handshakes, dead connections).
    pub lost: u64,
    /// Delivered more than once, or out of order.
    pub duplicated: u64,
    /// Failed the payload check, or reached a receiver that was not a target.
    pub corrupted: u64,
}

/// One run, as written to the results file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// Scenario name, e.g. `relay-k10`.
    pub scenario: String,
    /// Server name, e.g. `switchboard`.
    pub server: String,
    /// Repetition number.
    pub rep: u32,
    /// The scenario's parameters.
    pub params: String,
    /// What one operation is.
    pub unit: String,
    /// Connections held.
    pub connections: u64,
    /// Window length in seconds.
    pub secs: f64,
    /// Operations in the window.
    pub ops: u64,
    /// Operations per second.
    pub ops_per_s: f64,
    /// Messages sent per second.
    pub sent_per_s: f64,
    /// Server CPU seconds in the window.
    pub server_cpu_s: f64,
    /// Server CPU microseconds per operation.
    pub server_cpu_us_per_op: Option<f64>,
    /// Server CPU use in cores (1.0 = one core busy).
    pub server_cpu_util: f64,
    /// The share of the server's CPU time spent in the kernel (0-1).
    #[serde(default)]
    pub server_kernel_share: Option<f64>,
    /// Server CPU seconds of each server process (a cluster's nodes).
    #[serde(default)]
    pub server_cpu_each_s: Vec<f64>,
    /// CPU seconds of the side processes (a cluster's Redis), when given.
    #[serde(default)]
    pub side_cpu_s: Option<f64>,
    /// Their CPU microseconds per operation.
    #[serde(default)]
    pub side_cpu_us_per_op: Option<f64>,
    /// Server resident memory at the end of the window.
    pub server_rss_bytes: u64,
    /// Server memory per held connection.
    pub rss_per_conn_bytes: Option<f64>,
    /// Median latency, microseconds.
    pub p50_us: Option<f64>,
    /// 99th percentile latency, microseconds.
    pub p99_us: Option<f64>,
    /// 99.9th percentile latency, microseconds.
    pub p999_us: Option<f64>,
    /// Load generator CPU use in cores.
    pub loadgen_cpu_util: f64,
    /// The share of the machine's CPU time stolen by the hypervisor (0-1).
    #[serde(default)]
    pub steal_share: Option<f64>,
    /// Whether the load generator was busy enough to be the bottleneck.
    pub loadgen_bound: bool,
    /// Operations expected over the whole run.
    pub expected: u64,
    /// Lost operations.
    pub lost: u64,
    /// Duplicated deliveries.
    pub duplicated: u64,
    /// Corrupted deliveries.
    pub corrupted: u64,
    /// Left out of reports: more of the machine's time was stolen during the
    /// window than `--max-steal` allowed, and the run was to be repeated.
    #[serde(default)]
    pub discarded: bool,
}

impl Record {
    /// The record of a run of `scenario` against `server`.
    pub fn new(scenario: String, server: String, rep: u32, m: Measured) -> Self {
        let secs = m.window.secs.max(f64::EPSILON);
        let quantile = |q: f64| {
            m.latency
                .as_ref()
                .and_then(|h| h.quantile(q))
                .map(|ns| ns as f64 / 1000.0)
        };
        let loadgen_cpu_util = m.window.own_cpu_s / secs;
        let per_op = m.unit != HELD && m.ops > 0;
        Self {
            scenario,
            server,
            rep,
            params: m.params,
            unit: m.unit.into(),
            connections: m.connections,
            secs,
            ops: m.ops,
            ops_per_s: m.ops as f64 / secs,
            sent_per_s: m.sent as f64 / secs,
            server_cpu_s: m.window.server_cpu_s,
            server_cpu_us_per_op: per_op.then(|| m.window.server_cpu_s * 1e6 / m.ops as f64),
            server_cpu_util: m.window.server_cpu_s / secs,
            server_kernel_share: (m.window.server_cpu_s > 0.0)
                .then(|| m.window.server_sys_s / m.window.server_cpu_s),
            server_cpu_each_s: m.window.server_cpu_each_s.clone(),
            side_cpu_s: m.window.side_cpu_s,
            side_cpu_us_per_op: m
                .window
                .side_cpu_s
                .filter(|_| per_op)
                .map(|cpu| cpu * 1e6 / m.ops as f64),
            server_rss_bytes: m.server_rss_bytes,
            rss_per_conn_bytes: m.rss_per_conn_bytes,
            p50_us: quantile(0.5),
            p99_us: quantile(0.99),
            p999_us: quantile(0.999),
            loadgen_cpu_util,
            steal_share: Some(m.window.steal_share),
            loadgen_bound: loadgen_cpu_util > LOADGEN_BOUND_UTIL,
            expected: m.expected,
            lost: m.lost,
            duplicated: m.duplicated,
            corrupted: m.corrupted,
            discarded: false,
        }
    }

    /// Whether the run lost, duplicated or corrupted anything.
    pub fn delivery_failed(&self) -> bool {
        self.lost + self.duplicated + self.corrupted > 0
    }

    /// Whether more than `percent`% of the machine's time was stolen during the
    /// window, so that the run should be discarded and repeated. A failed
    /// delivery is a finding whatever the steal, so such a run never is.
    pub fn exceeds_steal(&self, percent: f64) -> bool {
        self.steal_share
            .is_some_and(|share| share * 100.0 > percent)
            && !self.delivery_failed()
    }

    /// A one-line summary for the terminal.
    pub fn summary(&self) -> String {
        let mut line = if self.unit == HELD {
            format!(
                "{} {} rep {}: held {} connections",
                self.scenario, self.server, self.rep, self.ops
            )
        } else {
            format!(
                "{} {} rep {}: {:.0} {}/s",
                self.scenario, self.server, self.rep, self.ops_per_s, self.unit
            )
        };
        line.push_str(&format!(", server {:.2} cores", self.server_cpu_util));
        if let Some(us) = self.server_cpu_us_per_op {
            line.push_str(&format!(", {us:.2} us CPU/{}", self.unit));
        }
        if let (Some(p50), Some(p99)) = (self.p50_us, self.p99_us) {
            line.push_str(&format!(", p50 {p50:.0} us, p99 {p99:.0} us"));
        }
        if let Some(bytes) = self.rss_per_conn_bytes {
            line.push_str(&format!(", {bytes:.0} B RSS/conn"));
        }
        line.push_str(&format!(", loadgen {:.2} cores", self.loadgen_cpu_util));
        if let Some(steal) = self.steal_share {
            line.push_str(&format!(", steal {:.1}%", steal * 100.0));
        }
        line.push_str(&format!(
            "; lost {} dup {} corrupt {}",
            self.lost, self.duplicated, self.corrupted
        ));
        line
    }

    /// Appends this record as one JSON line to `path`.
    pub fn append_to(&self, path: &Path) -> anyhow::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        writeln!(file, "{}", serde_json::to_string(self)?)?;
        Ok(())
    }

    /// Reads every record of a JSON-lines file.
    pub fn read_all(path: &Path) -> anyhow::Result<Vec<Self>> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        text.lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| serde_json::from_str(line).context("parsing a result line"))
            .collect()
    }
}

#[cfg(test)]
impl Record {
    /// A run of relay-k1 costing `cpu_us` per delivery, with 2% steal.
    pub fn sample(server: &str, rep: u32, cpu_us: f64) -> Self {
        Self {
            scenario: "relay-k1".into(),
            server: server.into(),
            rep,
            params: "N=10".into(),
            unit: "delivery".into(),
            connections: 10,
            secs: 1.0,
            ops: 1000,
            ops_per_s: 1000.0,
            sent_per_s: 1000.0,
            server_cpu_s: cpu_us * 1e-3,
            server_cpu_us_per_op: Some(cpu_us),
            server_cpu_util: cpu_us * 1e-3,
            server_kernel_share: Some(0.5),
            server_cpu_each_s: vec![cpu_us * 1e-3],
            side_cpu_s: None,
            side_cpu_us_per_op: None,
            server_rss_bytes: 1 << 20,
            rss_per_conn_bytes: None,
            p50_us: Some(100.0),
            p99_us: Some(200.0),
            p999_us: Some(300.0),
            loadgen_cpu_util: 0.95,
            steal_share: Some(0.02),
            loadgen_bound: true,
            expected: 1000,
            lost: 0,
            duplicated: 0,
            corrupted: 0,
            discarded: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_with_too_much_steal_are_discarded_unless_a_delivery_failed() {
        let run = Record::sample("switchboard", 1, 1.0);
        assert!(run.exceeds_steal(1.0), "2% is over 1%");
        assert!(!run.exceeds_steal(5.0), "2% is within 5%");
        let lost = Record {
            lost: 1,
            ..run.clone()
        };
        assert!(!lost.exceeds_steal(1.0), "a lost delivery is always kept");
        let unknown = Record {
            steal_share: None,
            ..run
        };
        assert!(!unknown.exceeds_steal(0.0));
    }
}
