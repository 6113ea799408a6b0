//! The binary starts or fails cleanly: a configuration error is one line on
//! stderr, exit code 2, before anything binds or says it is listening.

use std::process::{Command, Output};

fn serve(args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    command.arg("serve");
    if !args.contains(&"--listen") {
        command.args(["--listen", "127.0.0.1:0"]);
    }
    if !args.contains(&"--data-dir") {
        command.args(["--persist", "false"]);
    }
    command
        .args(args)
        // A backtrace would be for a bug; a configuration error is not one.
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap()
}

/// Asserts `output` is a clean failure with `code`, and returns its one line.
fn one_line_failure(output: &Output, code: i32) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(code), "{stderr}");
    assert!(!stdout.contains("listening"), "{stdout}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("switchboard: error: "), "{stderr}");
    assert!(!stderr.to_lowercase().contains("backtrace"), "{stderr}");
    stderr.trim_end().to_owned()
}

#[test]
fn a_short_hs256_secret_stops_the_service_before_it_listens() {
    let output = serve(&["--jwt-hs256-secret", "too-short"]);
    let line = one_line_failure(&output, 2);
    assert!(
        line.contains("is 9 bytes, and must be at least 32"),
        "{line}"
    );
    assert!(line.contains("--jwt-hs256-secret"), "{line}");
}

#[test]
fn a_missing_key_file_is_a_configuration_error() {
    let output = serve(&["--jwt-public-key", "/nonexistent/key.pem"]);
    let line = one_line_failure(&output, 2);
    assert!(line.contains("/nonexistent/key.pem"), "{line}");
}

#[test]
fn config_file_errors_are_one_line_with_their_place() {
    let dir = std::env::temp_dir().join(format!("switchboard-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let broken = dir.join("broken.toml");
    std::fs::write(&broken, "max_targets = 10\nlisten = [oops\n").unwrap();
    let unknown = dir.join("unknown.toml");
    std::fs::write(&unknown, "max_target = 10\n").unwrap();

    let output = serve(&["--config", broken.to_str().unwrap()]);
    let line = one_line_failure(&output, 2);
    assert!(
        line.contains("broken.toml") && line.contains("line 2"),
        "{line}"
    );

    let output = serve(&["--config", unknown.to_str().unwrap()]);
    let line = one_line_failure(&output, 2);
    assert!(line.contains("unknown field `max_target`"), "{line}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_address_in_use_is_one_line_and_exit_code_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let output = serve(&["--listen", &addr]);
    let line = one_line_failure(&output, 1);
    assert!(line.contains(&format!("binding {addr}")), "{line}");
}

/// With thread-per-core every socket is bound with SO_REUSEPORT, which lets
/// another process of the same user bind the same port: a second instance
/// started silently, and the kernel split the clients between two servers.
#[test]
fn a_port_another_instance_serves_thread_per_core_is_in_use() {
    use std::io::{BufRead, BufReader};
    let per_core = ["--scheduler", "thread-per-core", "--workers", "2"];
    let mut first = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["serve", "--listen", "127.0.0.1:0", "--persist", "false"])
        .args(per_core)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(first.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();
    let mut second = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["serve", "--listen", &addr, "--persist", "false"])
        .args(per_core)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while second.try_wait().unwrap().is_none() && started.elapsed().as_secs() < 10 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let running = second.try_wait().unwrap().is_none();
    for process in [&mut first, &mut second] {
        let _ = process.kill();
    }
    first.wait().unwrap();
    let second = second.wait_with_output().unwrap();
    assert!(!running, "a second instance started on {addr}");
    let line = one_line_failure(&second, 1);
    assert!(line.contains(&format!("binding {addr}")), "{line}");
}

/// `RUST_LOG`, when set, wins over `--log-level`.
#[test]
fn rust_log_wins_over_the_log_level() {
    use std::io::{BufRead, BufReader};
    let logs = |rust_log: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_switchboard"));
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--persist", "false"])
            .args(["--log-level", "off"])
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if let Some(filter) = rust_log {
            command.env("RUST_LOG", filter);
        }
        let mut server = command.spawn().unwrap();
        // Ready once it says it listens; what it logged by then is on stderr.
        let mut line = String::new();
        BufReader::new(server.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        server.kill().unwrap();
        String::from_utf8_lossy(&server.wait_with_output().unwrap().stderr).into_owned()
    };
    assert!(!logs(None).contains("switchboard listening"));
    assert!(logs(Some("info")).contains("switchboard listening"));
}
