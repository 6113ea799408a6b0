//! The `switchboard` command.

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use switchboard_server::config::{Config, ServeArgs};
use switchboard_server::workers::{self, Layout};
use switchboard_server::{logging, server, snapshot};

/// jemalloc rather than glibc's malloc: it keeps each size of allocation on
/// pages of its own, so what connections give back (a hibernating one's task)
/// is reused for the same thing or returned to the system, instead of being
/// split into holes between what stays (docs/performance.md, "Hibernation").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Switchboard: a WebSocket relay. Clients connect to /ws?id=<id> and send
/// {"targets":[...],"payload":...}; the payload reaches every connection of every target.
///
/// Settings come from embedded defaults, then --config FILE (TOML), then
/// SWITCHBOARD_* environment variables, then flags. See docs/configuration.md.
#[derive(Debug, Parser)]
#[command(name = "switchboard", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the relay service (Ctrl-C or SIGTERM closes clients with 1012, saves history to the data directory and exits 0)
    Serve(ServeArgs),
}

/// Exit code for a configuration that cannot run (as clap uses for bad flags).
const CONFIG_ERROR: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let config = match Config::load(&args) {
                Ok(config) => config,
                Err(error) => return fail(&error, ExitCode::from(CONFIG_ERROR)),
            };
            match serve(&config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => fail(&error, ExitCode::FAILURE),
            }
        }
    }
}

/// Reports `error` as one line on stderr, its causes joined with ": ", and no
/// backtrace whatever `RUST_BACKTRACE` says: it is for the operator, not a bug.
/// Written or not: a stderr that is a closed pipe must not turn the exit
/// code into a panic's.
fn fail(error: &anyhow::Error, code: ExitCode) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "switchboard: error: {error:#}");
    code
}

fn serve(config: &Config) -> anyhow::Result<()> {
    logging::init(config.log_format, &config.log_level);
    // Read (not yet used up) before binding: a snapshot that cannot be read
    // stops the start, and one read is not lost if binding fails (it is used
    // up once the service is about to serve: `server::serve`).
    let (snapshot, _lock) = match &config.data_dir {
        Some(dir) => {
            let lock = snapshot::lock(dir)?;
            (snapshot::open(dir, config.start_fresh)?, Some(lock))
        }
        None => (None, None),
    };
    let layout = Layout::new(config.workers, config.scheduler);
    let runtime = layout.main_runtime()?;
    let (listener, workers, api_listener) = {
        let _entered = runtime.enter();
        let (listener, workers) = layout
            .bind(config.listen)
            .with_context(|| format!("binding {}", config.listen))?;
        let api_listener = match config.api_listen {
            Some(api_addr) => {
                Some(workers::listen(api_addr).with_context(|| format!("binding {api_addr}"))?)
            }
            None => None,
        };
        (listener, workers, api_listener)
    };
    let addr = listener.local_addr()?;
    let api_addr = api_listener
        .as_ref()
        .map(|api| api.local_addr())
        .transpose()?;
    // Once the start is sure, just before serving (see `server::serve`).
    let announce = || {
        let scheme = if config.tls.is_some() { "wss" } else { "ws" };
        tracing::info!(
            %addr,
            workers = layout.threads(),
            "switchboard listening; clients connect to {scheme}://{addr}/ws"
        );
        // Tests and scripts read these lines to find port-0 listeners (and
        // find the log line above written by then). Written or not (a reader
        // gone), the service serves: the snapshot is used up by now.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on {addr}");
        if let Some(api_addr) = api_addr {
            let _ = writeln!(out, "api listening on {api_addr}");
        }
        let _ = out.flush();
    };
    let ended = runtime.block_on(async {
        let listeners = server::Listeners {
            main: listener,
            workers,
            api: api_listener,
        };
        let signals = server::Signals::new()?;
        server::serve(config, listeners, snapshot, announce, signals).await
    })?;
    // The runtime's tasks (an HTTP request still in flight past the drain
    // time) end here, so nothing appends while the streams are written.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    // Saved whatever ended the service: the snapshot it started from is gone.
    let saved = server::save_history(config, &*ended.engine);
    match ended.error {
        Some(error) => {
            if let Err(unsaved) = saved {
                tracing::error!(error = format!("{unsaved:#}"), "history not saved");
            }
            Err(error)
        }
        None => saved,
    }
}
