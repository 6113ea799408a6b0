//! Reading history over HTTP: `GET /api/v1/history/{topic}` and
//! `GET /api/v1/clients/{id}/inbox`, each with `?since=EPOCH:OFFSET&limit=N`.
//!
//! Without `since`, the latest `limit` messages; with it, up to `limit` of
//! those right after it, oldest first, so a backend pages through a stream by
//! passing the last offset it got. A `since` the stream no longer holds says
//! `"recovered": false` and gives nothing, as a resuming client is told.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::api::{Api, ApiError, ApiPath, checked_id, checked_topic};
use crate::errors::ErrorCode;
use crate::streams::{Page, Position};

/// Messages per page when `limit` is not given.
pub(crate) const DEFAULT_LIMIT: usize = 100;
/// The most messages one page may hold.
pub(crate) const MAX_LIMIT: usize = 1000;

/// `GET /api/v1/history/{topic}`.
pub(crate) async fn topic(
    State(api): State<Api>,
    ApiPath(topic): ApiPath,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let topic = checked_topic(&api.hub, &topic)?;
    let namespace = api.hub.namespaces.find(topic).expect("checked");
    let Some(retention) = namespace.history() else {
        let message = format!("{topic:?} keeps no history: its namespace has history_size 0");
        return Err(ApiError::bad_request(ErrorCode::HistoryDisabled, message));
    };
    let (since, limit) = paging(&query)?;
    let (page, position) = api
        .hub
        .engine
        .read_topic(topic.into(), retention, since.clone(), limit)
        .await?;
    answer(Of::Topic(topic), page, &position, since.as_ref())
}

/// `GET /api/v1/clients/{id}/inbox`.
pub(crate) async fn inbox(
    State(api): State<Api>,
    ApiPath(id): ApiPath,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let id = checked_id(&id)?;
    let (since, limit) = paging(&query)?;
    let (page, position) = api
        .hub
        .engine
        .read_inbox(id.clone(), since.clone(), limit)
        .await?;
    answer(Of::Client(&id), page, &position, since.as_ref())
}

/// `since` and `limit` from the query, checked.
fn paging(query: &HashMap<String, String>) -> Result<(Option<Position>, usize), ApiError> {
    let since = query
        .get("since")
        .map(|text| {
            parse_since(text).ok_or_else(|| {
                ApiError::bad_request(
                    ErrorCode::InvalidSince,
                    format!(
                        "invalid since {text:?}: expected EPOCH:OFFSET, e.g. since=k3x9ab12:16"
                    ),
                )
            })
        })
        .transpose()?;
    let limit = limit(query, DEFAULT_LIMIT, MAX_LIMIT)?;
    Ok((since, limit))
}

/// `?limit=` from the query: 1 to `max`, `default` when absent.
fn limit(query: &HashMap<String, String>, default: usize, max: usize) -> Result<usize, ApiError> {
    let Some(text) = query.get("limit") else {
        return Ok(default);
    };
    text.parse()
        .ok()
        .filter(|n| (1..=max).contains(n))
        .ok_or_else(|| {
            let message = format!("invalid limit {text:?}: 1 to {max}");
            ApiError::bad_request(ErrorCode::InvalidRequest, message)
        })
}

/// `EPOCH:OFFSET`, as `?since=` on `/ws` takes it.
pub(crate) fn parse_since(text: &str) -> Option<Position> {
    let (epoch, offset) = text.split_once(':')?;
    let epoch_ok =
        (1..=32).contains(&epoch.len()) && epoch.bytes().all(|b| b.is_ascii_alphanumeric());
    let offset_ok = !offset.is_empty() && offset.bytes().all(|b| b.is_ascii_digit());
    if !(epoch_ok && offset_ok) {
        return None;
    }
    Some(Position {
        epoch: epoch.into(),
        offset: offset.parse().ok()?,
    })
}

/// One page, as the client gets it.
#[derive(Serialize)]
struct PageBody<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    topic: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client: Option<&'a str>,
    epoch: &'a str,
    offset: u64,
    recovered: bool,
    messages: Vec<MessageBody<'a>>,
}

#[derive(Serialize)]
struct MessageBody<'a> {
    offset: u64,
    from: Option<&'a str>,
    /// The payload's JSON text, byte for byte: parsed into a `Value` it
    /// would lose what the relay promises to keep (1e999999, lone
    /// surrogates, duplicate keys, digits past a double's).
    payload: &'a RawValue,
}

/// Which stream a page is of.
enum Of<'a> {
    Topic(&'a str),
    Client(&'a str),
}

fn answer(
    of: Of<'_>,
    page: Page,
    position: &Position,
    since: Option<&Position>,
) -> Result<Response, ApiError> {
    let (recovered, entries) = match page {
        Page::Messages(entries) => (true, entries),
        Page::Lost => (false, Vec::new()),
        Page::Ahead => {
            let asked = since.map_or(0, |s| s.offset);
            let message = format!(
                "since is ahead of this stream (offset {asked} > {})",
                position.offset
            );
            return Err(ApiError::bad_request(ErrorCode::InvalidSince, message));
        }
    };
    let messages = entries
        .iter()
        .map(|entry| MessageBody {
            offset: entry.offset,
            from: entry.from.as_deref(),
            payload: serde_json::from_str(&entry.payload)
                .expect("a stream holds the JSON text of payloads that were checked"),
        })
        .collect();
    let (topic, client) = match of {
        Of::Topic(topic) => (Some(topic), None),
        Of::Client(client) => (None, Some(client)),
    };
    let body = PageBody {
        topic,
        client,
        epoch: &position.epoch,
        offset: position.offset,
        recovered,
        messages,
    };
    let json = serde_json::to_vec(&body).expect("pages serialise");
    Ok(([(header::CONTENT_TYPE, "application/json")], json).into_response())
}
