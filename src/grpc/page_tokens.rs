//! Page tokens of every keyset-paged list: the cursor of the next page and a hash of the query it was issued for,
//! as unpadded URL-safe base64 of a JSON object. A token is opaque to callers and bound to its query: one issued
//! for another list, filter or order is refused, so a page never continues a different walk.

use base64::Engine;
use serde_json::{Map, Value};
use tonic::Status;

use super::status::bad_field;

fn query_hash(query: &str) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(query.as_bytes())[..8])
}

/// The token of the page that starts after `cursor` (its named fields) in the list `query` describes.
pub fn issue<'a>(query: &str, cursor: impl IntoIterator<Item = (&'a str, Value)>) -> String {
    let mut json: Map<String, Value> = cursor
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect();
    json.insert("q".to_owned(), query_hash(query).into());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Value::Object(json).to_string())
}

/// The cursor `token` holds (none for the first page, an empty token), if this server issued it for `query`;
/// `read` takes the cursor's fields from the token's JSON. `same` says what a caller must send again with a token.
pub fn redeem<T>(
    token: &str,
    query: &str,
    same: &str,
    read: impl FnOnce(&Value) -> Option<T>,
) -> Result<Option<T>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = |why: &str| {
        bad_field(
            "INVALID_PAGE_TOKEN",
            "page_token",
            format!("page_token {why}: pass next_page_token of the previous page, with {same}"),
        )
    };
    let json: Value = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or_else(|| invalid("is not one this server issued"))?;
    if json["q"].as_str() != Some(&query_hash(query)) {
        return Err(invalid("belongs to another query"));
    }
    read(&json)
        .map(Some)
        .ok_or_else(|| invalid("is not one this server issued"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn after(json: &Value) -> Option<String> {
        json["after"].as_str().map(str::to_owned)
    }

    #[test]
    fn a_token_gives_back_its_cursor_for_its_own_query_only() {
        let token = issue("projects", [("after", "b1".into())]);
        assert_eq!(
            redeem(&token, "projects", "the same request", after).unwrap(),
            Some("b1".to_owned())
        );
        assert_eq!(
            redeem("", "projects", "the same request", after).unwrap(),
            None
        );
        let refused = |token: &str, query: &str| {
            let status = redeem(token, query, "the same request", after).unwrap_err();
            assert_eq!(super::super::status::reason(&status), "INVALID_PAGE_TOKEN");
            status.message().to_owned()
        };
        assert!(refused(&token, "environments of demo").contains("belongs to another query"));
        for garbage in ["garbage", "!!", &issue("projects", [("at", "x".into())])] {
            let message = refused(garbage, "projects");
            assert!(
                message.contains("is not one this server issued")
                    && message.contains("the same request"),
                "{garbage}: {message}"
            );
        }
    }
}
