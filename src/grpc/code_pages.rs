//! Keyset pages over lists ordered by a unique code (ListProjects, ListEnvironments).
//!
//! A page token holds the last code seen and a hash of the query it belongs to; the next page starts after that
//! code, so entries created or deleted between pages never shift or repeat one. The store's keyset query
//! (`Store::projects_after`, `Store::environments_after`) fetches the page, one entry more than it holds to tell
//! whether another page follows.

use base64::Engine;
use tonic::Status;

use super::status::bad_field;

const DEFAULT_SIZE: i32 = 50;
const MAX_SIZE: i32 = 1000;

pub struct Page {
    query: String,
    size: usize,
    after: Option<String>,
}

fn query_hash(query: &str) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(query.as_bytes())[..8])
}

impl Page {
    /// The page `token` asks for, if it was issued for `query`.
    pub fn of(query: &str, page_size: i32, token: &str) -> Result<Page, Status> {
        let size = match page_size {
            0 => DEFAULT_SIZE,
            1..=MAX_SIZE => page_size,
            _ => {
                return Err(bad_field(
                    "INVALID_PAGE_SIZE",
                    "page_size",
                    format!("page_size {page_size}: use 1 to {MAX_SIZE}, or 0 for {DEFAULT_SIZE}"),
                ))
            }
        } as usize;
        let after = if token.is_empty() {
            None
        } else {
            let invalid = |why: &str| {
                bad_field(
                    "INVALID_PAGE_TOKEN",
                    "page_token",
                    format!("page_token {why}: pass next_page_token of the previous page, with the same request"),
                )
            };
            let json: serde_json::Value = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(token)
                .ok()
                .and_then(|bytes| serde_json::from_slice(&bytes).ok())
                .ok_or_else(|| invalid("is not one this server issued"))?;
            if json["q"].as_str() != Some(&query_hash(query)) {
                return Err(invalid("belongs to another query"));
            }
            Some(
                json["after"]
                    .as_str()
                    .ok_or_else(|| invalid("is not one this server issued"))?
                    .to_owned(),
            )
        };
        Ok(Page {
            query: query.to_owned(),
            size,
            after,
        })
    }

    /// The code the page starts after (none on the first page).
    pub fn after(&self) -> Option<&str> {
        self.after.as_deref()
    }

    /// How many entries to fetch after [`Page::after`]: the page's size and one more, which says a next page exists.
    pub fn fetch(&self) -> usize {
        self.size + 1
    }

    /// This page of `fetched` (the [`Page::fetch`] entries after [`Page::after`], ordered by `code`) and the token
    /// of the next one ("" on the last).
    pub fn cut<T>(&self, mut fetched: Vec<T>, code: impl Fn(&T) -> &String) -> (Vec<T>, String) {
        let next = if fetched.len() > self.size {
            fetched.truncate(self.size);
            let json = serde_json::json!({
                "q": query_hash(&self.query),
                "after": fetched.last().map(&code),
            });
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json.to_string())
        } else {
            String::new()
        };
        (fetched, next)
    }
}
