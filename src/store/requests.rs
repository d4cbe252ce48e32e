//! Idempotency keys of mutating API calls (AIP-155): a call's `request_id` is claimed with a fingerprint of the
//! request; the call's encoded response is stored when it succeeds, so a repeat returns the original response, and
//! a different request under a used id is refused. Keys are kept for [`REQUEST_ID_WINDOW`].

use super::db::query;
use std::time::Duration;

use super::{Store, StoreError};

/// How long a request id is remembered after its first use.
pub const REQUEST_ID_WINDOW: Duration = Duration::from_secs(24 * 60 * 60);

/// A claim with no response after this long belongs to a call that died with its server: a repeat may take it over.
pub const ABANDONED_AFTER: Duration = Duration::from_secs(5 * 60);

/// The answer of [`Store::claim_request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestClaim {
    /// The id is this call's: do the work, then [`Store::complete_request`] (or [`Store::release_request`]).
    New,
    /// The same request succeeded before: its encoded response.
    Done(Vec<u8>),
    /// The same request is being served right now by another call.
    InProgress,
    /// The id was used for a different request (another method, or other fields).
    Mismatch { method: String },
}

fn ago(window: Duration) -> String {
    let at = chrono::Utc::now() - chrono::Duration::from_std(window).unwrap_or_default();
    at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl Store {
    /// Claims `request_id` for a call of `method` whose request hashes to `fingerprint`.
    pub async fn claim_request(
        &self,
        request_id: &str,
        method: &str,
        fingerprint: &str,
    ) -> Result<RequestClaim, StoreError> {
        // The request id's row orders concurrent claims of one id (the insert waits for an uncommitted insert of
        // the same id; a takeover is a compare-and-set): no store-wide lock.
        let mut tx = self.pool.row_tx().await?;
        query("DELETE FROM api_requests WHERE created_at < $1")
            .bind(ago(REQUEST_ID_WINDOW))
            .execute(&mut tx)
            .await?;
        let inserted = query(
            "INSERT INTO api_requests (request_id, method, fingerprint, response, created_at) \
             VALUES ($1, $2, $3, NULL, $4) ON CONFLICT (request_id) DO NOTHING",
        )
        .bind(request_id)
        .bind(method)
        .bind(fingerprint)
        .bind(super::now())
        .execute(&mut tx)
        .await?
        .rows_affected();
        let claim = if inserted == 1 {
            RequestClaim::New
        } else {
            let row = query(
                "SELECT method, fingerprint, response, created_at FROM api_requests WHERE request_id = $1",
            )
            .bind(request_id)
            .fetch_one(&mut tx)
            .await?;
            let (used_method, used_fingerprint): (String, String) = (row.get(0), row.get(1));
            let response: Option<Vec<u8>> = row.get(2);
            let created_at: String = row.get(3);
            if used_method != method || used_fingerprint != fingerprint {
                RequestClaim::Mismatch {
                    method: used_method,
                }
            } else if let Some(response) = response {
                RequestClaim::Done(response)
            } else if created_at < ago(ABANDONED_AFTER) {
                // Of two repeats taking over the same abandoned claim, one wins; the other sees it in progress.
                let taken = query(
                    "UPDATE api_requests SET created_at = $1 \
                     WHERE request_id = $2 AND created_at = $3 AND response IS NULL",
                )
                .bind(super::now())
                .bind(request_id)
                .bind(&created_at)
                .execute(&mut tx)
                .await?
                .rows_affected();
                if taken == 1 {
                    RequestClaim::New
                } else {
                    RequestClaim::InProgress
                }
            } else {
                RequestClaim::InProgress
            }
        };
        tx.commit().await?;
        Ok(claim)
    }

    /// Records the response of the call that claimed `request_id`.
    pub async fn complete_request(
        &self,
        request_id: &str,
        response: &[u8],
    ) -> Result<(), StoreError> {
        query("UPDATE api_requests SET response = $1 WHERE request_id = $2")
            .bind(response)
            .bind(request_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Gives up a claim whose call failed, so that the same request may be tried again.
    pub async fn release_request(&self, request_id: &str) -> Result<(), StoreError> {
        query("DELETE FROM api_requests WHERE request_id = $1 AND response IS NULL")
            .bind(request_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
