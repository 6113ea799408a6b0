//! Measuring processes from outside: CPU time and resident memory from `/proc`.
//!
//! [`Probe`] reads the server under test (one process, or a cluster's nodes,
//! and apart from them the processes it needs, such as Redis) or the load
//! generator itself; [`Window`] takes CPU readings of them, and of the
//! machine's stolen time, at the start and end of the measured interval.

use std::time::Instant;

use anyhow::{Context as _, bail};

/// Clock ticks per second of `/proc/PID/stat` times. The kernel reports them in
/// USER_HZ, which is 100 on every Linux architecture's user-space ABI.
const USER_HZ: f64 = 100.0;

/// The processes to measure: the server's, summed, and the side processes
/// it needs (measured apart).
#[derive(Debug, Clone)]
pub struct Probe {
    dirs: Vec<String>,
    side: Vec<String>,
}

fn proc_dirs(pids: &[u32]) -> Vec<String> {
    pids.iter().map(|pid| format!("/proc/{pid}")).collect()
}

impl Probe {
    /// The server's processes (a cluster's nodes), and `side` processes.
    pub fn server(pids: &[u32], side: &[u32]) -> Self {
        Self {
            dirs: proc_dirs(pids),
            side: proc_dirs(side),
        }
    }

    /// The load generator itself.
    pub fn own() -> Self {
        Self {
            dirs: vec!["/proc/self".into()],
            side: Vec::new(),
        }
    }

    /// User plus system CPU seconds used so far, by every thread the process has
    /// had (`utime` + `stime`, fields 14 and 15 of `/proc/PID/stat`).
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        self.cpu_times().map(|(user, system)| user + system)
    }

    /// User and system CPU seconds used so far, apart, by the server's
    /// processes together.
    pub fn cpu_times(&self) -> anyhow::Result<(f64, f64)> {
        let mut sum = (0.0, 0.0);
        for (user, system) in self.each_cpu_times()? {
            sum = (sum.0 + user, sum.1 + system);
        }
        Ok(sum)
    }

    /// User and system CPU seconds of each server process.
    fn each_cpu_times(&self) -> anyhow::Result<Vec<(f64, f64)>> {
        self.dirs.iter().map(|dir| cpu_times(dir)).collect()
    }

    /// CPU seconds of the side processes together.
    fn side_cpu_seconds(&self) -> anyhow::Result<f64> {
        self.side
            .iter()
            .map(|dir| cpu_times(dir).map(|(user, system)| user + system))
            .sum()
    }

    /// Resident set size in bytes (`VmRSS` of `/proc/PID/status`), of the
    /// server's processes together.
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        self.dirs
            .iter()
            .map(|dir| {
                let path = format!("{dir}/status");
                let status =
                    std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
                parse_rss_kib(&status).map(|kib| kib * 1024)
            })
            .sum()
    }
}

/// User and system CPU seconds the process at `dir` has used.
fn cpu_times(dir: &str) -> anyhow::Result<(f64, f64)> {
    let path = format!("{dir}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let (user, system) = parse_cpu_ticks(&stat)?;
    Ok((user as f64 / USER_HZ, system as f64 / USER_HZ))
}

/// `utime` and `stime` from the text of `/proc/PID/stat`. The command name (field 2)
/// may contain spaces and parentheses, so fields are counted after its last `)`.
fn parse_cpu_ticks(stat: &str) -> anyhow::Result<(u64, u64)> {
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    // After the name come field 3 (state) onwards: utime is field 14, stime 15.
    let mut fields = after_name.split_whitespace().skip(11);
    match (fields.next(), fields.next()) {
        (Some(utime), Some(stime)) => Ok((utime.parse()?, stime.parse()?)),
        _ => bail!("unexpected /proc stat format"),
    }
}

/// The machine's CPU ticks so far, over every CPU: (stolen, all). Stolen time is
/// what the hypervisor gave to other guests while this one had work: the eighth
/// value of the `cpu` line of `/proc/stat`.
fn machine_ticks() -> anyhow::Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    parse_machine_ticks(&stat)
}

fn parse_machine_ticks(stat: &str) -> anyhow::Result<(u64, u64)> {
    let line = stat
        .lines()
        .find_map(|line| line.strip_prefix("cpu "))
        .context("no cpu line in /proc/stat")?;
    let ticks = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<Vec<u64>, _>>()?;
    // The first eight values (user to steal) split the time; the guest values
    // after them are already counted in user and nice.
    match ticks.get(7) {
        Some(&steal) => Ok((steal, ticks.iter().take(8).sum())),
        None => bail!("unexpected /proc/stat cpu line: {line}"),
    }
}

fn parse_rss_kib(status: &str) -> anyhow::Result<u64> {
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .context("no VmRSS line")?;
    Ok(line.trim().trim_end_matches("kB").trim().parse()?)
}

/// CPU readings of the server and the load generator at the start of a window.
#[derive(Debug)]
pub struct Window {
    started: Instant,
    server: Probe,
    /// Each server process's user and system CPU seconds.
    server_cpu: Vec<(f64, f64)>,
    side_cpu: f64,
    own_cpu: f64,
    machine: (u64, u64),
}

/// What a window measured.
#[derive(Debug, Clone)]
pub struct WindowFigures {
    /// Wall-clock length.
    pub secs: f64,
    /// Server CPU seconds used in the window.
    pub server_cpu_s: f64,
    /// The part of `server_cpu_s` spent in the kernel (system time).
    pub server_sys_s: f64,
    /// `server_cpu_s` of each server process, in the order given.
    pub server_cpu_each_s: Vec<f64>,
    /// CPU seconds of the side processes (a cluster's Redis), when there are.
    pub side_cpu_s: Option<f64>,
    /// Load generator CPU seconds used in the window.
    pub own_cpu_s: f64,
    /// The share of the machine's CPU time (all CPUs) stolen by the hypervisor
    /// in the window: on a shared host, latency tails and CPU times rise with it.
    pub steal_share: f64,
}

impl Window {
    /// Starts a window now.
    pub fn open(server: &Probe) -> anyhow::Result<Self> {
        Ok(Self {
            started: Instant::now(),
            server: server.clone(),
            server_cpu: server.each_cpu_times()?,
            side_cpu: server.side_cpu_seconds()?,
            own_cpu: Probe::own().cpu_seconds()?,
            machine: machine_ticks()?,
        })
    }

    /// Ends the window now.
    pub fn close(self) -> anyhow::Result<WindowFigures> {
        let each: Vec<(f64, f64)> = self
            .server
            .each_cpu_times()?
            .iter()
            .zip(&self.server_cpu)
            .map(|(now, then)| (now.0 - then.0, now.1 - then.1))
            .collect();
        let (steal, all) = machine_ticks()?;
        let (stolen, elapsed) = (steal - self.machine.0, all - self.machine.1);
        Ok(WindowFigures {
            secs: self.started.elapsed().as_secs_f64(),
            server_cpu_s: each.iter().map(|(user, system)| user + system).sum(),
            server_sys_s: each.iter().map(|(_, system)| system).sum(),
            server_cpu_each_s: each.iter().map(|(user, system)| user + system).collect(),
            side_cpu_s: if self.server.side.is_empty() {
                None
            } else {
                Some(self.server.side_cpu_seconds()? - self.side_cpu)
            },
            own_cpu_s: Probe::own().cpu_seconds()? - self.own_cpu,
            steal_share: stolen as f64 / elapsed.max(1) as f64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_a_tricky_command_name() {
        let stat = "1234 (a) b (c)) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0";
        assert_eq!(parse_cpu_ticks(stat).unwrap(), (250, 50));
    }

    #[test]
    fn reads_stolen_time_from_the_machine_line() {
        let stat = "cpu  100 0 50 800 0 0 10 40 7 0\ncpu0 50 0 25 400 0 0 5 20 7 0\n";
        assert_eq!(parse_machine_ticks(stat).unwrap(), (40, 1000));
        assert!(parse_machine_ticks("cpu  1 2 3\n").is_err());
        let (steal, all) = machine_ticks().unwrap();
        assert!(steal <= all);
    }

    #[test]
    fn reads_its_own_process() {
        let own = Probe::own();
        assert!(own.cpu_seconds().unwrap() >= 0.0);
        assert!(own.rss_bytes().unwrap() > 0);
        assert_eq!(
            parse_rss_kib("Name:\tx\nVmRSS:\t  2048 kB\n").unwrap(),
            2048
        );
    }
}
