//! Keyset pages over lists ordered by a unique code (ListProjects, ListEnvironments).
//!
//! A page token holds the last code seen and a hash of the query it belongs to; the next page starts after that
//! code, so entries created or deleted between pages never shift or repeat one. The store's keyset query
//! (`Store::projects_after`, `Store::environments_after`) fetches the page, one entry more than it holds to tell
//! whether another page follows.

use tonic::Status;

use super::page_tokens;
use super::status::bad_field;

const DEFAULT_SIZE: i32 = 50;
const MAX_SIZE: i32 = 1000;

pub struct Page {
    query: String,
    size: usize,
    after: Option<String>,
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
        let after = page_tokens::redeem(token, query, "the same request", |json| {
            json["after"].as_str().map(str::to_owned)
        })?;
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
            let after = fetched.last().map(&code);
            page_tokens::issue(&self.query, [("after", serde_json::json!(after))])
        } else {
            String::new()
        };
        (fetched, next)
    }
}
