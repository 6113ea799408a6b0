//! Run with `cargo run --release --example wscat -- ws://HOST:PORT/PATH [--protocol P]... [--header K:V]... [--ca FILE]`
//!
//! A WebSocket client for the terminal and for scripts: every line of stdin is
//! sent as a text message, every text message received is printed on its own
//! line on stdout (binary messages are noted on stderr). At the end of input
//! it closes cleanly and exits 0; if the server closes first, or the
//! connection fails, it says why on stderr and exits 1.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use clap::Parser;
use http::{HeaderName, HeaderValue};
use switchboard::client::Connector;
use switchboard::client::rustls;
use switchboard::{CloseCode, CloseReason, Context, Handler, Message, Outcome, TerminateReason};
use tokio::io::AsyncBufReadExt;

/// Connects to a WebSocket URL; stdin lines go out as text, text messages come out on stdout.
#[derive(Debug, Parser)]
struct Args {
    /// ws:// or wss:// URL
    url: String,
    /// Offer this subprotocol (repeatable)
    #[arg(long = "protocol", value_name = "P")]
    protocols: Vec<String>,
    /// Add a request header, as NAME:VALUE (repeatable)
    #[arg(long = "header", value_name = "K:V")]
    headers: Vec<String>,
    /// Trust the CA certificates in this PEM file for wss://
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
}

/// Prints what arrives, and keeps why the connection ended.
struct Print(Arc<Mutex<Option<TerminateReason>>>);

impl Handler for Print {
    type Info = ();

    fn handle_in(&mut self, message: Message, _ctx: &mut Context<'_, ()>) -> Outcome {
        match message {
            Message::Text(text) => {
                let mut out = std::io::stdout().lock();
                // A closed stdout (`| head`) is not the connection's problem.
                let _ = writeln!(out, "{}", &*text).and_then(|()| out.flush());
            }
            Message::Binary(data) => eprintln!("wscat: (a binary message of {} bytes)", data.len()),
            _ => {}
        }
        Outcome::Continue
    }

    fn terminate(&mut self, reason: &TerminateReason) {
        *self.0.lock().expect("not poisoned") = Some(reason.clone());
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("wscat: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let mut connector = Connector::new();
    for protocol in args.protocols {
        connector = connector.protocol(protocol);
    }
    for header in &args.headers {
        let (name, value) = header
            .split_once(':')
            .ok_or_else(|| format!("--header {header:?}: expected NAME:VALUE"))?;
        connector = connector.header(
            HeaderName::try_from(name.trim())?,
            HeaderValue::try_from(value.trim())?,
        );
    }
    if let Some(ca) = &args.ca {
        connector = connector.tls(Arc::new(tls_config(ca)?));
    }

    let ended = Arc::new(Mutex::new(None));
    let client = connector.connect(&args.url, Print(ended.clone())).await?;
    let handle = client.handle().clone();
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let input = async {
        while let Some(line) = lines.next_line().await? {
            if handle.push(Message::text(line)).is_err() {
                // The connection is closing or closed: nothing more goes out.
                return Ok::<_, std::io::Error>(false);
            }
        }
        Ok(true)
    };
    let finished = client.finished();
    tokio::pin!(finished);
    tokio::select! {
        read = input => {
            if read? {
                handle.close(CloseReason::new(CloseCode::NORMAL, ""));
            }
            finished.await;
        }
        () = &mut finished => {}
    }
    let reason = ended.lock().expect("not poisoned").take();
    match reason {
        // We closed at the end of input, and the server answered.
        Some(TerminateReason::Normal(close)) if close.code() == CloseCode::NORMAL => Ok(()),
        Some(TerminateReason::Remote(Some(close))) => {
            Err(format!("closed by the server: {} {}", close.code(), close.reason()).into())
        }
        other => Err(format!("connection ended: {other:?}").into()),
    }
}

/// A client TLS configuration that trusts the certificates in `ca`.
fn tls_config(ca: &std::path::Path) -> Result<rustls::ClientConfig, Box<dyn std::error::Error>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    Ok(rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth())
}
