//! The report: `results.md` with the medians of every scenario and server and the
//! ratios of the baseline server against every other, plus the charts.

use std::fmt::Write as _;

use anyhow::Context as _;

use crate::chart::{self, Bar, Panel};
use crate::cli::ReportArgs;
use crate::permutation;
use crate::record::{LOADGEN_BOUND_UTIL, Record};
use crate::summary::{Cell, group};

/// The figures compared between servers, with which direction is better.
struct Figure {
    name: &'static str,
    value: fn(&Record) -> Option<f64>,
    lower_is_better: bool,
    /// Compared for the scenarios that hold connections (idle), or for the others.
    held: bool,
}

const FIGURES: [Figure; 4] = [
    Figure {
        name: "server CPU per op",
        value: |r| r.server_cpu_us_per_op,
        lower_is_better: true,
        held: false,
    },
    Figure {
        name: "ops/s",
        value: |r| Some(r.ops_per_s),
        lower_is_better: false,
        held: false,
    },
    Figure {
        name: "p99 latency",
        value: |r| r.p99_us,
        lower_is_better: true,
        held: false,
    },
    Figure {
        name: "RSS per connection",
        value: |r| r.rss_per_conn_bytes,
        lower_is_better: true,
        held: true,
    },
];

/// Writes `results.md` and the charts.
pub fn write(args: &ReportArgs) -> anyhow::Result<()> {
    let mut records = Vec::new();
    for input in &args.input {
        records.extend(Record::read_all(input)?);
    }
    anyhow::ensure!(!records.is_empty(), "no results in {:?}", args.input);
    let left_out = LeftOut {
        discarded: records.iter().filter(|r| r.discarded).count(),
        over_steal: records
            .iter()
            .filter(|r| !r.discarded && !args.counts_steal(r))
            .count(),
    };
    let counted: Vec<&Record> = records
        .iter()
        .filter(|r| !r.discarded && args.counts_steal(r))
        .collect();
    anyhow::ensure!(
        !counted.is_empty(),
        "no run had at most {:?}% stolen",
        args.steal_at_most
    );
    let table = group(&counted, &args.baseline);
    std::fs::create_dir_all(&args.out_dir)?;
    let charts = write_charts(&table, &args.out_dir);
    let markdown = render(&table, args, &charts, &left_out);
    let path = args.out_dir.join("results.md");
    std::fs::write(&path, markdown).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("loadgen: wrote {}", path.display());
    if args.check {
        check(&records)?;
    }
    Ok(())
}

/// Fails if any run lost, duplicated or corrupted anything. The closing line is
/// the plain "N passed, N failed" that test runners print.
fn check(records: &[Record]) -> anyhow::Result<()> {
    let bad: Vec<&Record> = records
        .iter()
        .filter(|r| r.delivery_failed() || r.ops == 0)
        .collect();
    for r in &bad {
        eprintln!(
            "loadgen: {} against {}: {} {}s, lost {}, duplicated {}, corrupted {}",
            r.scenario, r.server, r.ops, r.unit, r.lost, r.duplicated, r.corrupted
        );
    }
    println!(
        "bench: {} passed, {} failed",
        records.len() - bad.len(),
        bad.len()
    );
    anyhow::ensure!(
        bad.is_empty(),
        "{} run(s) failed the delivery check",
        bad.len()
    );
    Ok(())
}

/// The runs a report does not count, and why.
struct LeftOut {
    /// Marked discarded by `--max-steal` when they ran (and run again).
    discarded: usize,
    /// Over the report's `--steal-at-most`.
    over_steal: usize,
}

impl ReportArgs {
    /// Whether `record` had little enough stolen to count in this report.
    fn counts_steal(&self, record: &Record) -> bool {
        self.steal_at_most.is_none_or(|most| {
            record
                .steal_share
                .is_some_and(|share| share * 100.0 <= most)
        })
    }
}

fn render(
    table: &[Vec<Cell<'_>>],
    args: &ReportArgs,
    charts: &[String],
    left_out: &LeftOut,
) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Benchmark results\n");
    if !args.command.is_empty() {
        let _ = writeln!(md, "Command: `{}`\n", args.command);
    }
    let _ = writeln!(md, "{}\n", machine_facts(&args.facts));
    let _ = writeln!(
        md,
        "Medians over the repetitions of each server, servers alternating within each \
         repetition. \"op\" is the scenario's unit: an echoed message, a delivered \
         message, a handshake, or a held connection. Latency is from the send \
         timestamp in the payload to its arrival. \"in kernel\" is the share of the \
         server's CPU time that was system time (`stime` of `/proc/PID/stat`): the \
         TCP stack, wake-ups and scheduling. \"steal\" is the share of the machine's \
         CPU time that the hypervisor gave to other guests during the window (`/proc/stat`): \
         on a shared host, CPU times and latency tails rise with it. lost/dup/corrupt \
         are totals over all repetitions and must be 0.\n"
    );
    let _ = writeln!(
        md,
        "| scenario | parameters | server | ops/s | server CPU µs/op | server cores | in kernel | p50 µs | p99 µs | p99.9 µs | steal | RSS/conn | server RSS MiB | loadgen cores | lost/dup/corrupt | runs |"
    );
    let _ = writeln!(
        md,
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"
    );
    let mut bound = Vec::new();
    for cell in table.iter().flatten() {
        let idle = cell.held_connections();
        let dagger = if cell.loadgen_bound() {
            bound.push(format!("{} / {}", cell.scenario, cell.server));
            " †"
        } else {
            ""
        };
        let params = cell.runs.first().map_or("", |r| r.params.as_str());
        let _ = writeln!(
            md,
            "| {} | {} | {} | {}{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {}/{}/{} | {} |",
            cell.scenario,
            params,
            cell.server,
            if idle {
                "–".into()
            } else {
                fmt(cell.median(|r| Some(r.ops_per_s)), 0)
            },
            dagger,
            if idle {
                "–".into()
            } else {
                fmt(cell.median(|r| r.server_cpu_us_per_op), 2)
            },
            fmt(cell.median(|r| Some(r.server_cpu_util)), 2),
            cell.median(|r| r.server_kernel_share)
                .map_or("–".into(), |share| format!("{:.0}%", share * 100.0)),
            fmt(cell.median(|r| r.p50_us), 0),
            fmt(cell.median(|r| r.p99_us), 0),
            fmt(cell.median(|r| r.p999_us), 0),
            cell.median(|r| r.steal_share)
                .map_or("–".into(), |share| format!("{:.1}%", share * 100.0)),
            cell.median(|r| r.rss_per_conn_bytes)
                .map_or("–".into(), bytes),
            fmt(
                cell.median(|r| Some(r.server_rss_bytes as f64 / 1048576.0)),
                1
            ),
            fmt(cell.median(|r| Some(r.loadgen_cpu_util)), 2),
            cell.sum(|r| r.lost),
            cell.sum(|r| r.duplicated),
            cell.sum(|r| r.corrupted),
            cell.runs.len(),
        );
    }
    if left_out.discarded > 0 {
        let _ = writeln!(
            md,
            "\n{} run(s) were discarded and run again because the hypervisor \
             took more of the machine's time during them than `--max-steal` allows; \
             `raw.jsonl` keeps them, marked `\"discarded\": true`.",
            left_out.discarded
        );
    }
    if let Some(most) = args.steal_at_most {
        let _ = writeln!(
            md,
            "\nOnly runs with at most {most}% stolen are counted (`--steal-at-most`): \
             {} other run(s) are left out.",
            left_out.over_steal
        );
    }
    if !bound.is_empty() {
        let _ = writeln!(
            md,
            "\n† The load generator used more than {:.0}% of a core in at least one run \
             here, so it may have been the bottleneck: {}.",
            LOADGEN_BOUND_UTIL * 100.0,
            bound.join("; ")
        );
    }
    render_ratios(&mut md, table, &args.baseline);
    if !charts.is_empty() {
        let _ = writeln!(md, "\n## Charts\n");
        for chart in charts {
            let _ = writeln!(md, "![{chart}]({chart})");
        }
    }
    md
}

/// The baseline's medians divided by each other server's.
fn render_ratios(md: &mut String, table: &[Vec<Cell<'_>>], baseline: &str) {
    let _ = writeln!(
        md,
        "\n## {baseline} ÷ peer\n\nEach figure is {baseline}'s median divided by the peer's: \
         below 1 means {baseline} uses less (CPU, latency, memory); for ops/s above 1 \
         means it does more. p is the two-sided Mann–Whitney test of the runs, done \
         by shuffling them between the two servers: how often the ranks of the runs \
         differ at least this much when the servers do not differ at all. A small p \
         (0.05 or less) says the runs do tell the servers apart; with 3 runs each it \
         cannot go below 0.1.\n"
    );
    let headers = FIGURES.map(|f| {
        format!(
            "{} ({} is better)",
            f.name,
            if f.lower_is_better { "lower" } else { "higher" }
        )
    });
    let _ = writeln!(md, "| scenario | peer | {} |", headers.join(" | "));
    let _ = writeln!(md, "|---|---|{}", "---:|".repeat(FIGURES.len()));
    for row in table {
        let Some(base) = row.iter().find(|c| c.server == baseline) else {
            continue;
        };
        for peer in row.iter().filter(|c| c.server != baseline) {
            let ratios: Vec<String> = FIGURES
                .iter()
                .map(|f| {
                    let applies = f.held == base.held_connections();
                    match (applies, base.median(f.value), peer.median(f.value)) {
                        (true, Some(a), Some(b)) if b > 0.0 => {
                            let p =
                                permutation::p_value(&base.values(f.value), &peer.values(f.value));
                            format!("{:.2}× ({})", a / b, p_text(p))
                        }
                        _ => "–".into(),
                    }
                })
                .collect();
            let _ = writeln!(
                md,
                "| {} | {} | {} |",
                base.scenario,
                peer.server,
                ratios.join(" | ")
            );
        }
    }
}

/// A p-value to two places; below 0.01 that would read as 0, which no test gives.
fn p_text(p: Option<f64>) -> String {
    match p {
        Some(p) if p < 0.01 => "p < 0.01".into(),
        p => format!("p {}", fmt(p, 2)),
    }
}

fn fmt(value: Option<f64>, decimals: usize) -> String {
    value.map_or("–".into(), |v| format!("{v:.decimals$}"))
}

fn bytes(value: f64) -> String {
    if value.abs() >= 10_000.0 {
        format!("{:.1} KiB", value / 1024.0)
    } else {
        format!("{value:.0} B")
    }
}

/// CPU, cores, memory and kernel of this machine, plus facts the caller passed.
fn machine_facts(extra: &[String]) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let memory = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .map(|l| l.trim().to_owned())
        .unwrap_or_default();
    let mut facts = vec![
        format!("nproc {cores}"),
        format!("CPU {model}"),
        format!("kernel {}", kernel.trim()),
        format!("memory {memory}"),
    ];
    facts.extend(extra.iter().cloned());
    format!("Machine and versions: {}.", facts.join("; "))
}

/// One chart: a figure drawn for every scenario of one kind.
struct ChartSpec {
    file: &'static str,
    title: &'static str,
    unit: &'static str,
    value: fn(&Record) -> Option<f64>,
    /// Drawn for the scenarios that hold connections (idle) or for the others.
    held: bool,
}

const CHARTS: [ChartSpec; 4] = [
    ChartSpec {
        file: "cpu_per_op.png",
        title: "Server CPU per operation",
        unit: "µs",
        value: |r| r.server_cpu_us_per_op,
        held: false,
    },
    ChartSpec {
        file: "throughput.png",
        title: "Operations per second",
        unit: "ops/s",
        value: |r| Some(r.ops_per_s),
        held: false,
    },
    ChartSpec {
        file: "latency_p99.png",
        title: "p99 latency",
        unit: "µs",
        value: |r| r.p99_us,
        held: false,
    },
    ChartSpec {
        file: "idle_rss_per_conn.png",
        title: "Server RSS per idle connection",
        unit: "bytes",
        value: |r| r.rss_per_conn_bytes,
        held: true,
    },
];

/// Draws every chart that has data; returns the file names written.
fn write_charts(table: &[Vec<Cell<'_>>], dir: &std::path::Path) -> Vec<String> {
    let mut written = Vec::new();
    for spec in &CHARTS {
        let panels: Vec<Panel> = table
            .iter()
            .filter(|row| {
                row.first()
                    .is_some_and(|c| c.held_connections() == spec.held)
            })
            .filter_map(|row| {
                let bars: Vec<Bar> = row
                    .iter()
                    .filter_map(|c| {
                        c.median(spec.value).map(|v| Bar {
                            label: c.server.to_owned(),
                            value: v,
                        })
                    })
                    .collect();
                (!bars.is_empty()).then(|| Panel {
                    title: row[0].scenario.to_owned(),
                    unit: spec.unit.to_owned(),
                    bars,
                })
            })
            .collect();
        if panels.is_empty() {
            continue;
        }
        match chart::draw(&dir.join(spec.file), spec.title, &panels) {
            Ok(()) => written.push(spec.file.to_owned()),
            Err(error) => eprintln!("loadgen: no chart {}: {error:#}", spec.file),
        }
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain_args() -> ReportArgs {
        ReportArgs {
            input: vec!["unused".into()],
            out_dir: "unused".into(),
            baseline: "switchboard".into(),
            steal_at_most: None,
            command: "bench/run.sh".into(),
            facts: vec![],
            check: false,
        }
    }

    #[test]
    fn the_table_has_medians_ratios_and_marks_loadgen_bound_runs() {
        let records = [
            Record::sample("peer", 1, 4.0),
            Record::sample("switchboard", 1, 1.0),
            Record::sample("switchboard", 2, 3.0),
            Record::sample("switchboard", 3, 2.0),
        ];
        let table = group(&records.iter().collect::<Vec<_>>(), "switchboard");
        assert_eq!(
            table[0][0].server, "switchboard",
            "the baseline comes first"
        );
        let left_out = LeftOut {
            discarded: 1,
            over_steal: 0,
        };
        let md = render(&table, &plain_args(), &[], &left_out);
        assert!(
            md.contains("| relay-k1 | N=10 | switchboard | 1000 † | 2.00 |"),
            "{md}"
        );
        // One peer run against three: of the 4 splits, 2 are as far apart in rank.
        assert!(
            md.contains(
                "| relay-k1 | peer | 0.50× (p 0.50) | 1.00× (p 1.00) | 1.00× (p 1.00) | – |"
            ),
            "{md}"
        );
        assert!(md.contains("| 300 | 2.0% |"), "steal after p99.9: {md}");
        assert!(md.contains("Command: `bench/run.sh`"));
        assert!(md.contains("| 0/0/0 | 3 |"), "{md}");
        assert!(md.contains("1 run(s) were discarded"), "{md}");
        assert!(!md.contains("--steal-at-most"), "{md}");
    }

    #[test]
    fn p_values_below_a_hundredth_do_not_read_as_zero() {
        assert_eq!(p_text(Some(0.00005)), "p < 0.01");
        assert_eq!(p_text(Some(0.031)), "p 0.03");
        assert_eq!(p_text(None), "p –");
    }

    #[test]
    fn runs_with_more_stolen_than_asked_or_none_recorded_are_not_counted() {
        let args = ReportArgs {
            steal_at_most: Some(1.0),
            ..plain_args()
        };
        let stolen = |share| Record {
            steal_share: share,
            ..Record::sample("switchboard", 1, 1.0)
        };
        assert!(args.counts_steal(&stolen(Some(0.01))));
        assert!(!args.counts_steal(&stolen(Some(0.0101))));
        assert!(!args.counts_steal(&stolen(None)));
        assert!(
            plain_args().counts_steal(&stolen(None)),
            "no filter, all count"
        );
    }

    #[test]
    fn a_report_pools_its_inputs_and_leaves_out_discarded_and_stolen_runs() {
        let dir = std::env::temp_dir().join(format!("loadgen-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let line = |record: Record| serde_json::to_string(&record).unwrap() + "\n";
        let first = dir.join("first.jsonl");
        let second = dir.join("second.jsonl");
        std::fs::write(
            &first,
            line(Record::sample("switchboard", 1, 1.0))
                + &line(Record {
                    discarded: true,
                    ..Record::sample("switchboard", 2, 50.0)
                }),
        )
        .unwrap();
        std::fs::write(
            &second,
            line(Record::sample("peer", 1, 4.0))
                + &line(Record {
                    steal_share: Some(0.3),
                    ..Record::sample("peer", 2, 100.0)
                }),
        )
        .unwrap();
        let args = ReportArgs {
            input: vec![first, second],
            out_dir: dir.clone(),
            steal_at_most: Some(5.0),
            ..plain_args()
        };
        write(&args).unwrap();
        let md = std::fs::read_to_string(dir.join("results.md")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(md.contains("| relay-k1 | peer | 0.25× (p 1.00)"), "{md}");
        assert!(md.contains("1 run(s) were discarded"), "{md}");
        assert!(md.contains("at most 5% stolen are counted"), "{md}");
        assert!(md.contains("1 other run(s) are left out"), "{md}");
    }
}
