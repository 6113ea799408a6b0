//! The upgrade without axum: a plain hyper `service_fn`, as a program that does
//! its own routing would use it.

mod common;

use std::convert::Infallible;

use common::{Probe, RawClient};
use hyper::Request;
use hyper::server::conn::http1;
use hyper::service::service_fn;
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
                        Ok(upgrade) => upgrade.on_upgrade(Probe::new(events)),
                        Err(error) => {
                            use axum::response::IntoResponse;
                            error.into_response()
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

    let (head, _) = RawClient::request(addr, "GET /ws HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 426"), "{head}");
}

#[tokio::test]
async fn on_failed_upgrade_hears_of_a_connection_hyper_never_hands_over() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (events, mut events_rx) = mpsc::unbounded_channel();
    let (failures, mut failed) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let service = service_fn(move |request: Request<hyper::body::Incoming>| {
            let (events, failures) = (events.clone(), failures.clone());
            async move {
                let (mut parts, _body) = request.into_parts();
                let upgrade = WebSocketUpgrade::from_parts(&mut parts).unwrap();
                let response = upgrade
                    .on_failed_upgrade(move |error| drop(failures.send(error.to_string())))
                    .on_upgrade(Probe::new(events));
                Ok::<_, Infallible>(response)
            }
        });
        // Without `with_upgrades`, hyper sends the 101 and never hands the
        // connection over: the upgrade fails after the response.
        let _ = http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service)
            .await;
    });
    let _client = RawClient::connect(addr).await;
    let error = tokio::time::timeout(common::TIMEOUT, failed.recv())
        .await
        .expect("on_failed_upgrade was called")
        .unwrap();
    assert!(error.contains("could not be upgraded"), "{error}");
    // The handler never ran.
    assert!(events_rx.try_recv().is_err());
}
