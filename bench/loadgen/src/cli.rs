//! Command-line arguments: one subcommand per scenario, plus `report`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Switchboard's load generator: drives one scenario against one running server
/// from a single thread, measures the server from /proc, and appends one JSON
/// line of results; `report` turns those lines into tables and charts.
#[derive(Debug, Parser)]
#[command(name = "loadgen")]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The scenarios, and the report.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// C connections to an echo route, each keeping W messages of S bytes in flight.
    Echo {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: EchoArgs,
    },
    /// N relay clients (`/ws?id=1..N`) sending, at a fixed total rate, messages to
    /// K random other clients each.
    Relay {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: RelayArgs,
    },
    /// One publisher whose every message reaches all N subscribers: by listing
    /// them all as targets, or (--topic) through a switchboard.v1 topic.
    Fanout {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: FanoutArgs,
    },
    /// N relay clients connected and silent; the server's RSS per connection.
    Idle {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: IdleArgs,
    },
    /// Opening handshakes per second, from a few workers connecting in a loop.
    Storm {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: StormArgs,
    },
    /// Writes results.md and PNG charts from the JSON lines of many runs.
    Report(ReportArgs),
}

/// What every scenario needs: the server, its label, the timing and the output.
#[derive(Debug, Args)]
pub struct Common {
    /// The server's address; repeated (a cluster's nodes), connections are
    /// spread over them in turn.
    #[arg(long, required = true)]
    pub addr: Vec<SocketAddr>,
    /// The server's process id, measured through /proc; repeated (a
    /// cluster's nodes), their CPU and memory are summed, and each node's CPU
    /// is recorded too.
    #[arg(long, required = true)]
    pub pid: Vec<u32>,
    /// A process the server needs (a cluster's Redis), repeatable: its CPU in
    /// the window is recorded apart from the server's.
    #[arg(long)]
    pub side_pid: Vec<u32>,
    /// The server's name in the results.
    #[arg(long, default_value = "server")]
    pub server: String,
    /// The scenario's name in the results (default: the subcommand).
    #[arg(long)]
    pub label: Option<String>,
    /// Repetition number, recorded in the results.
    #[arg(long, default_value_t = 1)]
    pub rep: u32,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Seconds measured.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Most seconds to wait, after sending stops, for messages still in flight.
    #[arg(long, default_value_t = 3.0)]
    pub drain: f64,
    /// Client sockets bind to this many source addresses, 127.0.0.2 upwards, so
    /// that many connections do not run out of ephemeral ports.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u8).range(1..=250))]
    pub sources: u8,
    /// Offer permessage-deflate on every connection, and fail if the server
    /// declines it (to measure what compression costs).
    #[arg(long)]
    pub deflate: bool,
    /// Connect over TLS (wss://), trusting only the PEM CA certificate(s) in
    /// this file; the server is named by its IP address.
    #[arg(long, value_name = "FILE", value_parser = tls_trusting)]
    pub tls_ca: Option<crate::conn::Tls>,
    /// Appends the result as one JSON line to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Discards the run when the hypervisor took more than this percentage of
    /// the machine's CPU time during the measured window: the line is written
    /// marked `discarded` (reports leave it out) and the exit status is 3, so
    /// that the caller can run it again. A run that lost, duplicated or
    /// corrupted anything is never discarded.
    #[arg(long, value_name = "PERCENT")]
    pub max_steal: Option<f64>,
}

fn tls_trusting(ca_file: &str) -> Result<crate::conn::Tls, String> {
    crate::conn::Tls::trusting(ca_file.as_ref()).map_err(|e| format!("{e:#}"))
}

impl Common {
    /// The server's processes to measure.
    pub fn probe(&self) -> crate::measure::Probe {
        crate::measure::Probe::server(&self.pid, &self.side_pid)
    }

    /// The address for connection (or worker) number `index`.
    pub fn addr_for(&self, index: usize) -> SocketAddr {
        self.addr[index % self.addr.len()]
    }

    /// The source address of connection number `index`.
    pub fn source(&self, index: usize) -> std::net::IpAddr {
        let host = 2 + (index % usize::from(self.sources)) as u8;
        Ipv4Addr::new(127, 0, 0, host).into()
    }

    /// The warm-up, measured and drain periods.
    pub fn timing(&self) -> Timing {
        Timing {
            warmup: Duration::from_secs_f64(self.warmup),
            duration: Duration::from_secs_f64(self.duration),
            drain: Duration::from_secs_f64(self.drain),
        }
    }
}

/// The periods of a run.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Load before measuring.
    pub warmup: Duration,
    /// The measured window.
    pub duration: Duration,
    /// Longest wait for messages in flight after sending stops.
    pub drain: Duration,
}

/// Echo parameters.
#[derive(Debug, Args)]
pub struct EchoArgs {
    /// Connections (C).
    #[arg(long, default_value_t = 50)]
    pub connections: usize,
    /// Messages in flight per connection (W).
    #[arg(long, default_value_t = 10)]
    pub window: u32,
    /// Payload bytes (S); at least the ~60-byte header.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Request path of the echo route.
    #[arg(long, default_value = "/echo")]
    pub path: String,
}

/// Relay parameters.
#[derive(Debug, Args)]
pub struct RelayArgs {
    /// Clients (N), with ids 1 to N.
    #[arg(long, default_value_t = 1000)]
    pub clients: u32,
    /// Targets per message (K).
    #[arg(long, default_value_t = 1)]
    pub targets: usize,
    /// Messages per second, all clients together (the offered load).
    #[arg(long, default_value_t = 10_000.0)]
    pub rate: f64,
    /// Payload bytes.
    #[arg(long, default_value_t = 128)]
    pub size: usize,
}

/// Fan-out parameters.
#[derive(Debug, Args)]
pub struct FanoutArgs {
    /// Subscribers (N), with ids 1 to N.
    #[arg(long, default_value_t = 2000)]
    pub subscribers: u32,
    /// Messages per second from the publisher.
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// Payload bytes.
    #[arg(long, default_value_t = 128)]
    pub size: usize,
    /// Publish through the switchboard.v1 topic `bench:t` instead of listing targets.
    #[arg(long)]
    pub topic: bool,
}

/// Idle parameters.
#[derive(Debug, Args)]
pub struct IdleArgs {
    /// Connections to hold (the process fd limit here is 20,000).
    #[arg(long, default_value_t = 19_500)]
    pub connections: usize,
    /// Handshakes in progress at once while connecting.
    #[arg(long, default_value_t = 128)]
    pub concurrency: usize,
}

/// Connect-storm parameters.
#[derive(Debug, Args)]
pub struct StormArgs {
    /// Workers, each connecting, completing the handshake and closing in a loop.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
}

/// Report parameters.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// JSON lines written by the scenario runs; repeat it to pool the runs of
    /// several benchmarks into one report.
    #[arg(long, required = true)]
    pub input: Vec<PathBuf>,
    /// Counts only the runs during which the hypervisor took at most this
    /// percentage of the machine's CPU time (and leaves out runs that did not
    /// record it): latency tails follow stolen time, so servers are compared
    /// fairly only between runs with little of it.
    #[arg(long, value_name = "PERCENT")]
    pub steal_at_most: Option<f64>,
    /// Where results.md and the PNG charts go.
    #[arg(long)]
    pub out_dir: PathBuf,
    /// The server whose ratios against every other server are reported.
    #[arg(long, default_value = "switchboard")]
    pub baseline: String,
    /// The command that produced the runs, quoted in results.md.
    #[arg(long, default_value = "")]
    pub command: String,
    /// A fact to state beside the machine's, e.g. "bun 1.4.5" (repeatable).
    #[arg(long = "fact")]
    pub facts: Vec<String>,
    /// Fail unless every run completed without a lost, duplicated or corrupted
    /// delivery (the smoke test).
    #[arg(long)]
    pub check: bool,
}
