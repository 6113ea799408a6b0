//! Run with `cargo run --release -p switchboard-loadgen -- relay --addr 127.0.0.1:4000 --pid PID`
//! (`bench/run.sh` starts the servers and runs every scenario).
//!
//! Switchboard's load generator. It drives one scenario against one running
//! server, on one thread so that the server keeps the machine's other core, and
//! measures the server from outside through `/proc/PID`. Each run appends one
//! JSON line ([`record::Record`]); `loadgen report` turns the lines of a whole
//! benchmark into `results.md` and PNG charts.
//!
//! - [`conn`]: a WebSocket client over tokio TCP with `switchboard-proto` as codec.
//! - [`payload`]: the timestamped, checksummed payload and its byte-exact check.
//! - [`tally`], [`histogram`]: delivery accounting and latency.
//! - [`measure`]: CPU and RSS from `/proc`.
//! - [`scenario`]: echo, relay, fanout, idle, storm.
//! - [`record`], [`summary`], [`permutation`], [`report`], [`chart`]: results,
//!   medians, how far ratios could come from chance, markdown and PNG.

mod chart;
mod cli;
mod conn;
mod histogram;
mod measure;
mod payload;
mod permutation;
mod record;
mod report;
mod rng;
mod scenario;
mod summary;
mod tally;
mod targets;

use clap::Parser as _;

use crate::cli::{Cli, Command, Common};
use crate::record::{LOADGEN_BOUND_UTIL, Measured, Record};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (common, label) = match &cli.command {
        Command::Report(args) => return report::write(args),
        Command::Echo { common, .. } => (common, "echo"),
        Command::Relay { common, .. } => (common, "relay"),
        Command::Fanout { common, .. } => (common, "fanout"),
        Command::Idle { common, .. } => (common, "idle"),
        Command::Storm { common, .. } => (common, "storm"),
    };
    // One thread: the load generator must not take the server's core.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let measured = local.block_on(&runtime, run(&cli.command))?;
    // Tasks still parked on sockets are dropped with the runtime.
    drop(local);
    finish(common, label, measured)
}

async fn run(command: &Command) -> anyhow::Result<Measured> {
    match command {
        Command::Echo { common, args } => scenario::echo::run(common, args).await,
        Command::Relay { common, args } => scenario::relay::run(common, args).await,
        Command::Fanout { common, args } => scenario::fanout::run(common, args).await,
        Command::Idle { common, args } => scenario::idle::run(common, args).await,
        Command::Storm { common, args } => scenario::storm::run(common, args).await,
        Command::Report(_) => unreachable!("handled before the runtime starts"),
    }
}

/// The exit status of a run discarded for steal (`--max-steal`): run it again.
const DISCARDED: i32 = 3;

fn finish(common: &Common, label: &str, mut measured: Measured) -> anyhow::Result<()> {
    if common.deflate {
        measured.params.push_str(" permessage-deflate");
    }
    let scenario = common.label.clone().unwrap_or_else(|| label.to_owned());
    let mut record = Record::new(scenario, common.server.clone(), common.rep, measured);
    eprintln!("loadgen: {}", record.summary());
    if record.loadgen_bound {
        eprintln!(
            "loadgen: WARNING: the load generator used {:.0}% of a core (over {:.0}%): \
             it may be the bottleneck of this run, not the server",
            record.loadgen_cpu_util * 100.0,
            LOADGEN_BOUND_UTIL * 100.0
        );
    }
    if record.delivery_failed() {
        eprintln!(
            "loadgen: WARNING: {} lost, {} duplicated, {} corrupted",
            record.lost, record.duplicated, record.corrupted
        );
    }
    if let Some(limit) = common.max_steal
        && record.exceeds_steal(limit)
    {
        record.discarded = true;
        eprintln!(
            "loadgen: DISCARDED: the hypervisor took {:.1}% of the machine's time \
             (over --max-steal {limit}%); run it again",
            record.steal_share.unwrap_or(0.0) * 100.0
        );
    }
    match &common.out {
        Some(path) => record.append_to(path)?,
        None => println!("{}", serde_json::to_string(&record)?),
    }
    if record.discarded {
        std::process::exit(DISCARDED);
    }
    Ok(())
}
