//! AIP-155 request ids for every mutating call: the first call with an id runs and its response is stored; a
//! repeat of the same request returns that response without running again; a different request under a used id
//! is refused. See `store::requests` for the window.

use std::future::Future;
use tonic::{Code, Status};
use tonic_types::ErrorDetails;

use super::status::{bad_field, with_reason};
use crate::error::Error;
use crate::store::{RequestClaim, Store};

const MAX_REQUEST_ID: usize = 128;

/// The request id's shape: 1-128 printable ASCII characters.
fn check(request_id: &str) -> Result<(), Status> {
    if request_id.len() > MAX_REQUEST_ID || !request_id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad_field(
            "INVALID_REQUEST_ID",
            "request_id",
            format!("request_id must be 1-{MAX_REQUEST_ID} printable ASCII characters without spaces (a UUID is best)"),
        ));
    }
    Ok(())
}

fn fingerprint<M: prost::Message>(request: &M) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(request.encode_to_vec()))
}

/// Runs `call` at most once per `request_id` (taken out of `request`, whose remaining fields are its
/// fingerprint). `started` tells the caller whether this call ran (true) or replayed a stored response (false).
pub async fn once<M, R, F, Fut>(
    store: &Store,
    method: &str,
    request_id: String,
    request: &M,
    call: F,
) -> Result<(R, bool), Status>
where
    M: prost::Message,
    R: prost::Message + Default,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<R, Status>>,
{
    if request_id.is_empty() {
        return call().await.map(|r| (r, true));
    }
    check(&request_id)?;
    let claim = store
        .claim_request(&request_id, method, &fingerprint(request))
        .await
        .map_err(Error::from)?;
    match claim {
        RequestClaim::New => match call().await {
            Ok(response) => {
                store
                    .complete_request(&request_id, &response.encode_to_vec())
                    .await
                    .map_err(Error::from)?;
                Ok((response, true))
            }
            Err(status) => {
                let _ = store.release_request(&request_id).await;
                Err(status)
            }
        },
        RequestClaim::Done(bytes) => R::decode(bytes.as_slice())
            .map(|r| (r, false))
            .map_err(|e| {
                Status::internal(format!("the stored response of request_id {request_id:?} cannot be read: {e}"))
            }),
        RequestClaim::InProgress => Err(with_reason(
            Code::Aborted,
            "REQUEST_IN_PROGRESS",
            format!("a call with request_id {request_id:?} is still being served: retry shortly"),
            &[("request_id", request_id.clone())],
            ErrorDetails::new(),
        )),
        RequestClaim::Mismatch { method: used } => Err(with_reason(
            Code::InvalidArgument,
            "REQUEST_ID_REUSED",
            format!(
                "request_id {request_id:?} was already used for a different request ({used}): use a new id for a new request"
            ),
            &[("request_id", request_id.clone()), ("method", used)],
            ErrorDetails::with_bad_request_violation(
                "request_id",
                "already used for a different request",
            ),
        )),
    }
}
