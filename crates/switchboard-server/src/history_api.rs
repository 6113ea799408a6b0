//! Reading history over HTTP: `GET /api/v1/history/{topic}` and
//! `GET /api/v1/clients/{id}/inbox`, each with `?since=EPOCH:OFFSET&limit=N`.
//!
//! Without `since`, the latest `limit` messages; with it, up to `limit` of
//! those right after it, oldest first, so a backend pages through a stream by
//! passing the last offset it got. A `since` the stream no longer holds says
//! `"recovered": false` and gives nothing, as a resuming client is told.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use serde_json::{Value, json};

use crate::api::{Api, ApiError, checked_id, checked_topic};
use crate::errors::ErrorCode;
use crate::streams::{Page, Position};

/// Messages per page when `limit` is not given.
pub(crate) const DEFAULT_LIMIT: usize = 100;
/// The most messages one page may hold.
pub(crate) const MAX_LIMIT: usize = 1000;

/// `GET /api/v1/history/{topic}`.
pub(crate) async fn topic(
    State(api): State<Api>,
    Path(topic): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
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
        .read_topic(topic, retention, since.as_ref(), limit);
    answer(json!({"topic": topic}), page, &position, since.as_ref())
}

/// `GET /api/v1/clients/{id}/inbox`.
pub(crate) async fn inbox(
    State(api): State<Api>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let id = checked_id(&id)?;
    let (since, limit) = paging(&query)?;
    let (page, position) = api.hub.engine.read_inbox(&id, since.as_ref(), limit);
    answer(json!({"client": &*id}), page, &position, since.as_ref())
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
    let limit = match query.get("limit") {
        None => DEFAULT_LIMIT,
        Some(text) => text
            .parse()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(
                    ErrorCode::InvalidRequest,
                    format!("invalid limit {text:?}: 1 to {MAX_LIMIT}"),
                )
            })?,
    };
    Ok((since, limit))
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

fn answer(
    mut body: Value,
    page: Page,
    position: &Position,
    since: Option<&Position>,
) -> Result<Json<Value>, ApiError> {
    let (recovered, messages) = match page {
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
    let messages: Vec<Value> = messages
        .iter()
        .map(|entry| {
            let payload: Value = serde_json::from_str(&entry.payload).unwrap_or(Value::Null);
            json!({"offset": entry.offset, "from": entry.from.as_deref(), "payload": payload})
        })
        .collect();
    let object = body.as_object_mut().expect("an object");
    object.insert("epoch".into(), json!(&*position.epoch));
    object.insert("offset".into(), json!(position.offset));
    object.insert("recovered".into(), json!(recovered));
    object.insert("messages".into(), Value::Array(messages));
    Ok(Json(body))
}
