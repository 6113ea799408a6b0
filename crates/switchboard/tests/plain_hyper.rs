//! The upgrade without axum: a plain hyper `service_fn`, as a program that does
//! its own routing would use it.

mod common;

use std::convert::Infallible;

use common::{Probe, RawClient};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use switchboard::WebSocketUpgrade;
use switchboard::proto::OpCode;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

#[tokio::test]
async fn a_plain_hyper_service_can_upgrade() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (events, _events_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let events = events.clone();
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let events = events.clone();
                async move {
                    let (mut parts, _body) = request.into_parts();
                    let response = match WebSocketUpgrade::from_parts(&mut parts) {
                        Ok(upgrade) => upgrade.on_upgrade::<_, String>(Probe::new(events)),
                        Err(error) => {
                            let mut response = Response::new(error.to_string());
                            *response.status_mut() = error.status();
                            response
                        }
                    };
                    Ok::<_, Infallible>(response)
                }
            });
            tokio::spawn(
                http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades(),
            );
        }
    });

    let mut client = RawClient::connect(addr).await;
    assert_eq!(
        client.recv().await.unwrap(),
        (OpCode::Text, b"hello".to_vec())
    );
    client
        .send(&RawClient::frame(true, OpCode::Text, b"through hyper"))
        .await;
    assert_eq!(
        client.recv().await.unwrap(),
        (OpCode::Text, b"through hyper".to_vec())
    );

    let (head, _) = RawClient::request(addr, "GET /ws HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 426"), "{head}");
}
