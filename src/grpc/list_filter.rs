//! `ListChanges`' `filter` and `order_by` (an AIP-160 subset), and page tokens bound to them: a token says where
//! the previous page ended and which query it belongs to, so it cannot be replayed against another filter.

use tonic::Status;

use super::page_tokens;
use super::status::bad_field;
use crate::events::ChangeState;
use crate::store::{ChangeQuery, Keyset};

fn bad_filter(message: String) -> Status {
    bad_field("INVALID_FILTER", "filter", message)
}

fn unquote(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value)
}

fn label_part(text: &str) -> bool {
    (1..=63).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Whether a label key or value has the documented shape.
pub fn valid_label(key: &str, value: &str) -> bool {
    label_part(key) && label_part(value)
}

const MAX_LABELS: usize = 32;

/// Checks labels given on a create (at most 32, each key and value of the documented shape).
pub fn labels(
    labels: &std::collections::HashMap<String, String>,
) -> Result<crate::store::Labels, Status> {
    if labels.len() > MAX_LABELS {
        return Err(bad_field(
            "INVALID_LABELS",
            "labels",
            format!("at most {MAX_LABELS} labels"),
        ));
    }
    for (key, value) in labels {
        if !valid_label(key, value) {
            return Err(bad_field(
                "INVALID_LABELS",
                "labels",
                format!(
                    "label {key:?} = {value:?}: keys and values are 1-63 characters [A-Za-z0-9_.-]"
                ),
            ));
        }
    }
    Ok(labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

/// Adds `filter`'s terms to `query`.
pub fn parse_filter(filter: &str, query: &mut ChangeQuery) -> Result<(), Status> {
    let filter = filter.trim();
    if filter.is_empty() {
        return Ok(());
    }
    for term in filter.split(" AND ") {
        let term = term.trim();
        let (field, op, value) = ["<", ">", "="]
            .iter()
            .find_map(|op| {
                term.split_once(op)
                    .map(|(f, v)| (f.trim(), *op, unquote(v.trim())))
            })
            .ok_or_else(|| {
                bad_filter(format!(
                    "filter term {term:?} is not FIELD OP VALUE (e.g. state = running AND labels.team = \"a\")"
                ))
            })?;
        match (field, op) {
            ("state", "=") => query.states.push(ChangeState::parse(value).ok_or_else(|| {
                bad_filter(format!(
                    "unknown state {value:?} in filter: use pending, queued, running, success, error or cancelled"
                ))
            })?),
            ("action", "=") => query.action = Some(value.to_owned()),
            ("create_time", ">") | ("create_time", "<") => {
                let at = chrono::DateTime::parse_from_rfc3339(value).map_err(|_| {
                    bad_filter(format!("create_time {value:?} is not an RFC 3339 time"))
                })?;
                let at = at
                    .with_timezone(&chrono::Utc)
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                if op == ">" {
                    query.created_after = Some(at);
                } else {
                    query.created_before = Some(at);
                }
            }
            (field, "=") if field.starts_with("labels.") => {
                let key = &field["labels.".len()..];
                if !valid_label(key, value) {
                    return Err(bad_filter(format!(
                        "label {key:?} = {value:?}: keys and values are 1-63 characters [A-Za-z0-9_.-]"
                    )));
                }
                query.labels.push((key.to_owned(), value.to_owned()));
            }
            _ => {
                return Err(bad_filter(format!(
                    "filter term {term:?}: filter on state =, action =, labels.KEY = or create_time < / >"
                )))
            }
        }
    }
    Ok(())
}

/// Sets the order of `query` from `order_by`.
pub fn parse_order_by(order_by: &str, query: &mut ChangeQuery) -> Result<(), Status> {
    let words: Vec<&str> = order_by.split_whitespace().collect();
    query.oldest_first = match words.as_slice() {
        [] | ["create_time", "desc"] => false,
        ["create_time"] | ["create_time", "asc"] => true,
        _ => {
            return Err(bad_field(
                "INVALID_ORDER_BY",
                "order_by",
                format!("order_by {order_by:?}: use \"create_time desc\" (the default) or \"create_time asc\""),
            ))
        }
    };
    Ok(())
}

/// The token of the page after `last`.
pub fn page_token(query: &ChangeQuery, last: &Keyset) -> String {
    page_tokens::issue(
        &format!("{query:?}"),
        [
            ("at", last.created_at.clone().into()),
            ("id", last.id.clone().into()),
        ],
    )
}

/// Where the page of `token` starts, if it belongs to `query`.
pub fn parse_page_token(token: &str, query: &ChangeQuery) -> Result<Option<Keyset>, Status> {
    page_tokens::redeem(
        token,
        &format!("{query:?}"),
        "the same project, environment, filter and order_by",
        |json| {
            Some(Keyset {
                created_at: json["at"].as_str()?.to_owned(),
                id: json["id"].as_str()?.to_owned(),
            })
        },
    )
}
