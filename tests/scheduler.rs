//! The API as a scheduler uses it, through the tonic client generated from proto/runner/v1/runner.proto:
//! idempotent retries (also after a lost response), resumable and bounded watches, shutdown, keyset pages, labels,
//! and the code and `ErrorInfo.reason` of every error a scheduler acts on. Steps run on the fake executor.

#[path = "support/grpc_server.rs"]
mod grpc_server;
mod support;

use grpc_server::{change_request, channel_to, Options, Server};
use runner::app::App;
use runner::grpc::pb::change_service_client::ChangeServiceClient;
use runner::grpc::pb::{self, Scope};
use runner::grpc::run;
use runner::grpc::status::reason;
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;
use support::fakes::Script;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// The server of these tests before `.start()`: the manifest below, environments `dev` and `prod`, no token.
fn options() -> Options {
    Options::new(json!({"actions": {
        "deploy": {"steps": ["a"]}, "a": {"run": "a"}, "slow": {"run": "slow"}, "fail": {"run": "fail"},
        "hang": {"run": "hang", "timeout": "1s"}
    }}))
    .environment("prod", "Prod")
}

async fn start(scripts: Vec<(&str, Script)>) -> Server {
    options().scripts(scripts).start().await
}

/// Each store a server can have: SQLite in its data directory, and PostgreSQL (a fresh database on this process's
/// cluster; a machine without PostgreSQL fails the test unless RUNNER_TEST_SKIP_POSTGRES=1).
fn stores() -> Vec<(&'static str, Option<String>)> {
    let mut stores = vec![("SQLite", None)];
    if support::postgres::postgres_available() {
        stores.push(("PostgreSQL", Some(support::postgres::shared().database())));
    }
    stores
}

impl Server {
    /// Projects named (and coded) `codes`, without a remote.
    async fn add_projects(&self, codes: &[&str]) {
        for code in codes {
            self.projects()
                .create_project(pb::CreateProjectRequest {
                    code: code.to_string(),
                    name: code.to_string(),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    }

    async fn create(&self, request: pb::CreateChangeRequest) -> Result<pb::Change, Status> {
        self.changes()
            .create_change(request)
            .await
            .map(|r| r.into_inner())
    }
    async fn list(
        &self,
        request: pb::ListChangesRequest,
    ) -> Result<pb::ListChangesResponse, Status> {
        self.changes()
            .list_changes(request)
            .await
            .map(|r| r.into_inner())
    }
    async fn all_changes(&self) -> Vec<pb::Change> {
        self.list(pb::ListChangesRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .changes
    }
    /// A watch of change `id` from its first event.
    async fn watch(&self, id: &str) -> tonic::Streaming<pb::ChangeEvent> {
        self.changes()
            .watch_change(pb::WatchChangeRequest {
                id: id.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// Every event of a watch that must end by itself (within 10 s), and how it ended.
    async fn watch_to_end(
        &self,
        request: pb::WatchChangeRequest,
    ) -> (Vec<pb::ChangeEvent>, Result<(), Status>) {
        let mut stream = match self.changes().watch_change(request).await {
            Ok(stream) => stream.into_inner(),
            Err(status) => return (vec![], Err(status)),
        };
        let mut events = vec![];
        loop {
            match tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .expect("the watch ends by itself")
            {
                Ok(Some(event)) => events.push(event),
                Ok(None) => return (events, Ok(())),
                Err(status) => return (events, Err(status)),
            }
        }
    }
    async fn wait_finished(&self, id: &str) -> pb::Change {
        let (_, end) = self
            .watch_to_end(pb::WatchChangeRequest {
                id: id.into(),
                ..Default::default()
            })
            .await;
        end.unwrap();
        self.changes()
            .get_change(pb::GetChangeRequest {
                id: id.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .change
            .unwrap()
    }
}

fn create_request(action: &str, request_id: &str) -> pb::CreateChangeRequest {
    pb::CreateChangeRequest {
        request_id: request_id.into(),
        ..change_request(action)
    }
}

/// The code, and the `ErrorInfo` (domain runner.v1) reason, of a failed call.
#[track_caller]
fn assert_error<T: std::fmt::Debug>(
    result: Result<T, Status>,
    code: Code,
    expected_reason: &str,
) -> Status {
    let status = result.expect_err("the call fails");
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(reason(&status), expected_reason, "{status:?}");
    let details = status.get_error_details();
    assert_eq!(details.error_info().unwrap().domain, "runner.v1");
    assert!(
        !status.message().contains("`runner") && !status.message().contains("runner change"),
        "no CLI hints in API messages: {}",
        status.message()
    );
    status
}

#[tokio::test]
async fn duplicate_create_change_with_one_request_id_makes_one_change() {
    let server = start(vec![]).await;
    let first = server
        .create(create_request("deploy", "req-1"))
        .await
        .unwrap();
    let again = server
        .create(create_request("deploy", "req-1"))
        .await
        .unwrap();
    assert_eq!(first, again, "the original response, not a new change");
    let other = server
        .create(create_request("deploy", "req-2"))
        .await
        .unwrap();
    assert_ne!(other.id, first.id);
    let ids: Vec<String> = server
        .all_changes()
        .await
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert_eq!(
        server.wait_finished(&first.id).await.state(),
        pb::ChangeState::Success
    );
    server.stop().await;
}

#[tokio::test]
async fn a_used_request_id_with_another_request_is_invalid_argument() {
    let server = start(vec![]).await;
    server
        .create(create_request("deploy", "req-1"))
        .await
        .unwrap();
    let status = assert_error(
        server.create(create_request("a", "req-1")).await,
        Code::InvalidArgument,
        "REQUEST_ID_REUSED",
    );
    let details = status.get_error_details();
    let violation = &details.bad_request().unwrap().field_violations[0];
    assert_eq!(violation.field, "request_id");
    // Another method with the same id is a different request too.
    assert_error(
        server
            .changes()
            .cancel_change(pb::CancelChangeRequest {
                id: "x".into(),
                request_id: "req-1".into(),
            })
            .await,
        Code::InvalidArgument,
        "REQUEST_ID_REUSED",
    );
    assert_error(
        server.create(create_request("deploy", "has space")).await,
        Code::InvalidArgument,
        "INVALID_REQUEST_ID",
    );
    assert_eq!(server.all_changes().await.len(), 1);
    server.stop().await;
}

/// A TCP proxy that, on its first connection, forwards everything but cuts the connection when the server starts
/// answering a call (the first HTTP/2 HEADERS frame on a stream), so the call ran but its response is lost.
/// Later connections are forwarded whole.
async fn response_dropping_proxy(upstream: std::net::SocketAddr) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(upstream).await.unwrap();
            let drop_response = std::mem::take(&mut first);
            tokio::spawn(async move {
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let up = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                });
                if !drop_response {
                    let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                    up.abort();
                    return;
                }
                // Forward whole frames of the connection (stream 0) only; stop at the first response frame.
                loop {
                    let mut header = [0u8; 9];
                    if server_read.read_exact(&mut header).await.is_err() {
                        break;
                    }
                    let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
                    let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]])
                        & 0x7fff_ffff;
                    let mut payload = vec![0u8; length];
                    if server_read.read_exact(&mut payload).await.is_err() {
                        break;
                    }
                    if stream != 0 {
                        break; // the response: lost
                    }
                    if client_write.write_all(&header).await.is_err()
                        || client_write.write_all(&payload).await.is_err()
                    {
                        break;
                    }
                }
                up.abort();
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_retry_after_a_lost_response_makes_one_change() {
    let server = start(vec![]).await;
    let proxy = response_dropping_proxy(server.addr).await;
    let mut client = ChangeServiceClient::new(channel_to(proxy));
    let lost = client
        .create_change(create_request("deploy", "lost-once"))
        .await
        .expect_err("the response was dropped");
    assert_ne!(lost.code(), Code::Ok);
    // The change was created nonetheless: a naive retry would make a second one.
    assert_eq!(server.all_changes().await.len(), 1);
    let mut retry_client = ChangeServiceClient::new(channel_to(proxy));
    let retried = retry_client
        .create_change(create_request("deploy", "lost-once"))
        .await
        .expect("the retry answers")
        .into_inner();
    let all = server.all_changes().await;
    assert_eq!(all.len(), 1, "one change: {all:?}");
    assert_eq!(all[0].id, retried.id);
    assert_eq!(
        server.wait_finished(&retried.id).await.state(),
        pb::ChangeState::Success
    );
    server.stop().await;
}

#[tokio::test]
async fn retry_and_cancel_with_a_request_id_act_once() {
    let server = start(vec![(
        "a",
        Script {
            exit_code: 3,
            ..Default::default()
        },
    )])
    .await;
    let change = server.create(create_request("deploy", "")).await.unwrap();
    assert_eq!(
        server.wait_finished(&change.id).await.state(),
        pb::ChangeState::Error
    );
    let retry = |id: &str| pb::RetryChangeRequest {
        id: id.into(),
        request_id: "retry-1".into(),
    };
    let first = server
        .changes()
        .retry_change(retry(&change.id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        server.wait_finished(&change.id).await.state(),
        pb::ChangeState::Error
    );
    // The same retry again answers the first result and does not run the change a third time.
    let again = server
        .changes()
        .retry_change(retry(&change.id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first, again);
    let (events, _) = server
        .watch_to_end(pb::WatchChangeRequest {
            id: change.id.clone(),
            ..Default::default()
        })
        .await;
    let runs = events
        .iter()
        .filter(|e| matches!(&e.event, Some(pb::change_event::Event::ChangeState(s)) if s.state() == pb::ChangeState::Running))
        .count();
    assert_eq!(runs, 2, "created once, retried once");
    server.stop().await;
}

#[tokio::test]
async fn a_retried_change_keeps_its_first_attempt_beside_the_second() {
    let server = start(vec![(
        "a",
        Script {
            exit_code: 3,
            // Long enough that a watch from seq 0 right after the retry meets attempt 1's end first: it must not end
            // there (wait_finished below relies on it).
            delay: Duration::from_millis(300),
            ..Default::default()
        },
    )])
    .await;
    let change = server.create(create_request("deploy", "")).await.unwrap();
    assert_eq!(change.attempt, 1);
    assert_eq!(
        server.wait_finished(&change.id).await.state(),
        pb::ChangeState::Error
    );
    let retried = server
        .changes()
        .retry_change(pb::RetryChangeRequest {
            id: change.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retried.attempt, 2);
    let current = server.wait_finished(&change.id).await;
    assert_eq!(
        (current.state(), current.attempt),
        (pb::ChangeState::Error, 2)
    );

    let detail = |attempt: i64| {
        let mut changes = server.changes();
        let id = change.id.clone();
        async move {
            changes
                .get_change(pb::GetChangeRequest { id, attempt })
                .await
                .map(|r| r.into_inner())
        }
    };
    let step_a = |d: &pb::ChangeDetail| d.steps.iter().find(|s| s.action == "a").unwrap().clone();
    let now = detail(0).await.unwrap();
    assert_eq!(
        now,
        detail(2).await.unwrap(),
        "the current attempt is the default"
    );
    assert_eq!((now.attempts, now.change.as_ref().unwrap().attempt), (2, 2));
    let first = detail(1).await.unwrap();
    assert_eq!(first.attempts, 2);
    let first_change = first.change.as_ref().unwrap();
    assert_eq!(
        (first_change.attempt, first_change.state()),
        (1, pb::ChangeState::Error)
    );
    assert!(!first_change.reason.is_empty());
    let (a1, a2) = (step_a(&first), step_a(&now));
    assert_eq!(a1.id, a2.id, "the same step, run in each attempt");
    assert_eq!(
        (a1.state(), a1.attempt, a1.exit_code),
        (pb::StepState::Error, 1, Some(3))
    );
    assert_eq!((a2.state(), a2.attempt), (pb::StepState::Error, 2));
    assert!(!a1.reason.is_empty());
    assert_ne!(a1.start_time, a2.start_time);
    let step = |attempt: i64| {
        let mut changes = server.changes();
        let id = a1.id.clone();
        async move {
            changes
                .get_step(pb::GetStepRequest { id, attempt })
                .await
                .map(|r| r.into_inner())
        }
    };
    assert_eq!(step(1).await.unwrap(), a1);
    assert_eq!(step(0).await.unwrap(), a2);

    assert_error(detail(-1).await, Code::InvalidArgument, "INVALID_ATTEMPT");
    assert_error(step(-2).await, Code::InvalidArgument, "INVALID_ATTEMPT");
    assert_error(detail(3).await, Code::NotFound, "ATTEMPT_NOT_FOUND");

    // A watch from the start sees both attempts, numbered without gaps and tagged.
    let (events, end) = server
        .watch_to_end(pb::WatchChangeRequest {
            id: change.id.clone(),
            ..Default::default()
        })
        .await;
    end.unwrap();
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=events.len() as i64).collect::<Vec<_>>());
    let attempts: Vec<i64> = events.iter().map(|e| e.attempt).collect();
    assert!(attempts.windows(2).all(|w| w[0] <= w[1]), "{attempts:?}");
    for attempt in [1, 2] {
        let failed = events.iter().any(|e| {
            e.attempt == attempt
                && matches!(&e.event, Some(pb::change_event::Event::StepState(s)) if s.step_id == a1.id && s.state() == pb::StepState::Error)
        });
        assert!(failed, "attempt {attempt}'s failure of a is tagged with it");
    }
    server.stop().await;
}

#[tokio::test]
async fn log_lines_say_which_service_they_came_from() {
    let server = start(vec![(
        "a",
        Script {
            output: vec![
                "the step's own line".into(),
                "[service web] web is up".into(),
            ],
            ..Default::default()
        },
    )])
    .await;
    let change = server.create(create_request("deploy", "")).await.unwrap();
    let (events, end) = server
        .watch_to_end(pb::WatchChangeRequest {
            id: change.id.clone(),
            ..Default::default()
        })
        .await;
    end.unwrap();
    let lines: Vec<(String, String)> = events
        .into_iter()
        .filter_map(|e| match e.event {
            Some(pb::change_event::Event::Log(l)) => Some((l.service, l.line)),
            _ => None,
        })
        .collect();
    assert_eq!(
        lines,
        [
            (String::new(), "the step's own line".to_owned()),
            ("web".to_owned(), "[service web] web is up".to_owned())
        ]
    );
    server.stop().await;
}

#[tokio::test]
async fn retrying_a_succeeded_change_is_failed_precondition() {
    let server = start(vec![]).await;
    let change = server.create(create_request("deploy", "")).await.unwrap();
    assert_eq!(
        server.wait_finished(&change.id).await.state(),
        pb::ChangeState::Success
    );
    let status = assert_error(
        server
            .changes()
            .retry_change(pb::RetryChangeRequest {
                id: change.id.clone(),
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
        "CHANGE_NOT_RETRYABLE",
    );
    let details = status.get_error_details();
    let violation = &details.precondition_failure().unwrap().violations[0];
    assert_eq!(violation.subject, format!("changes/{}", change.id));
    server.stop().await;
}

#[tokio::test]
async fn watch_at_the_end_of_a_finished_change_returns_at_once() {
    let server = start(vec![]).await;
    let change = server.create(create_request("deploy", "")).await.unwrap();
    server.wait_finished(&change.id).await;
    let (all, end) = server
        .watch_to_end(pb::WatchChangeRequest {
            id: change.id.clone(),
            ..Default::default()
        })
        .await;
    end.unwrap();
    let last = all.last().unwrap().seq;
    let started = std::time::Instant::now();
    let (rest, end) = server
        .watch_to_end(pb::WatchChangeRequest {
            id: change.id.clone(),
            after_seq: last,
            ..Default::default()
        })
        .await;
    end.unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "it ended by itself, not by timing out"
    );
    // Resuming in the middle sends exactly the rest.
    let (tail, _) = server
        .watch_to_end(pb::WatchChangeRequest {
            id: change.id.clone(),
            after_seq: last - 2,
            ..Default::default()
        })
        .await;
    assert_eq!(tail, all[all.len() - 2..].to_vec());
    server.stop().await;
}

#[tokio::test]
async fn watch_rejects_bad_cursors_and_unknown_changes() {
    let server = start(vec![]).await;
    let change = server.create(create_request("deploy", "")).await.unwrap();
    server.wait_finished(&change.id).await;
    let watch = |id: &str, after_seq: i64| pb::WatchChangeRequest {
        id: id.into(),
        after_seq,
        ..Default::default()
    };
    let (_, end) = server.watch_to_end(watch(&change.id, -1)).await;
    assert_error(end, Code::InvalidArgument, "INVALID_CURSOR");
    let (_, end) = server.watch_to_end(watch(&change.id, 10_000)).await;
    let status = assert_error(end, Code::OutOfRange, "CURSOR_PAST_END");
    assert!(
        status.get_error_details().error_info().unwrap().metadata["last_seq"]
            .parse::<i64>()
            .unwrap()
            > 0
    );
    let (_, end) = server.watch_to_end(watch("nope", 0)).await;
    assert_error(end, Code::NotFound, "CHANGE_NOT_FOUND");
    let (_, end) = server.watch_to_end(watch("", 0)).await;
    assert_error(end, Code::InvalidArgument, "FIELD_REQUIRED");
    server.stop().await;
}

#[tokio::test]
async fn shutdown_ends_watchers_with_unavailable() {
    let server = start(vec![("slow", Script::sleeping(Duration::from_secs(1)))]).await;
    let change = server.create(create_request("slow", "")).await.unwrap();
    let mut stream = server.watch(&change.id).await;
    stream.message().await.unwrap().expect("the first event");
    let stopping = tokio::spawn(server.stop());
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("the watch ends at shutdown")
        {
            Ok(Some(_)) => continue,
            Ok(None) => break Ok(()),
            Err(status) => break Err::<(), _>(status),
        }
    };
    assert_error(end, Code::Unavailable, "SERVER_SHUTTING_DOWN");
    stopping.await.unwrap();
}

#[tokio::test]
async fn keyset_pages_show_changes_created_between_pages_exactly_once() {
    let server = start(vec![]).await;
    let mut created = vec![];
    for _ in 0..5 {
        created.push(
            server
                .create(create_request("deploy", ""))
                .await
                .unwrap()
                .id,
        );
    }
    for (order_by, sees_new) in [("create_time asc", true), ("", false)] {
        let mut seen: Vec<String> = vec![];
        let mut token = String::new();
        loop {
            let page = server
                .list(pb::ListChangesRequest {
                    page_size: 2,
                    page_token: token.clone(),
                    order_by: order_by.into(),
                    ..Default::default()
                })
                .await
                .unwrap();
            seen.extend(page.changes.into_iter().map(|c| c.id));
            // Between every two pages a new change arrives (an offset would repeat one on the next page).
            let new = server
                .create(create_request("deploy", ""))
                .await
                .unwrap()
                .id;
            created.push(new);
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        let mut unique = seen.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(
            unique.len(),
            seen.len(),
            "no change twice ({order_by:?}): {seen:?}"
        );
        let before: Vec<&String> = created.iter().take(5).collect();
        for id in before {
            assert!(seen.contains(id), "{id} missing ({order_by:?})");
        }
        if sees_new {
            // Oldest first: the changes created while paging come at the end, each once.
            assert!(seen.len() > 5, "{seen:?}");
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn page_tokens_are_bound_to_their_filter_and_bad_queries_are_invalid_argument() {
    let server = start(vec![]).await;
    for _ in 0..3 {
        server.create(create_request("deploy", "")).await.unwrap();
    }
    let page = server
        .list(pb::ListChangesRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!page.next_page_token.is_empty());
    let list = |page_token: &str, filter: &str, order_by: &str| pb::ListChangesRequest {
        page_size: 1,
        page_token: page_token.into(),
        filter: filter.into(),
        order_by: order_by.into(),
        ..Default::default()
    };
    // (case, request, reason); every one is InvalidArgument.
    let cases = [
        (
            "a token under another filter",
            list(&page.next_page_token, "action = deploy", ""),
            "INVALID_PAGE_TOKEN",
        ),
        (
            "a token that is no token",
            list("garbage", "", ""),
            "INVALID_PAGE_TOKEN",
        ),
        (
            "an unknown filter field",
            list("", "colour = red", ""),
            "INVALID_FILTER",
        ),
        ("an unknown order", list("", "", "name"), "INVALID_ORDER_BY"),
    ];
    let mut answers = vec![];
    for (case, request, expected) in cases {
        answers.push((case, (server.list(request).await, expected)));
    }
    support::each_case(answers, |(answer, expected)| {
        assert_error(answer, Code::InvalidArgument, expected);
    });
    server.stop().await;
}

#[tokio::test]
async fn labels_are_kept_and_filter_the_list() {
    let server = start(vec![(
        "fail",
        Script {
            exit_code: 1,
            ..Default::default()
        },
    )])
    .await;
    let mut request = create_request("deploy", "");
    request.labels = HashMap::from([("batch".into(), "b1".into()), ("team".into(), "red".into())]);
    let labelled = server.create(request).await.unwrap();
    assert_eq!(labelled.labels["batch"], "b1");
    let other = server.create(create_request("fail", "")).await.unwrap();
    server.wait_finished(&labelled.id).await;
    server.wait_finished(&other.id).await;
    let ids = |r: pb::ListChangesResponse| r.changes.into_iter().map(|c| c.id).collect::<Vec<_>>();
    let filtered = |filter: &str| pb::ListChangesRequest {
        filter: filter.into(),
        ..Default::default()
    };
    assert_eq!(
        ids(server
            .list(filtered("labels.batch = \"b1\""))
            .await
            .unwrap()),
        vec![labelled.id.clone()]
    );
    assert_eq!(
        ids(server.list(filtered("labels.batch = b2")).await.unwrap()),
        Vec::<String>::new()
    );
    assert_eq!(
        ids(server.list(filtered("state = error")).await.unwrap()),
        vec![other.id.clone()]
    );
    assert_eq!(
        ids(server
            .list(filtered("action = deploy AND labels.team = red"))
            .await
            .unwrap()),
        vec![labelled.id.clone()]
    );
    assert_eq!(
        ids(server
            .list(filtered("create_time > \"2999-01-01T00:00:00Z\""))
            .await
            .unwrap())
        .len(),
        0
    );
    let mut bad = create_request("deploy", "");
    bad.labels = HashMap::from([("has space".into(), "x".into())]);
    assert_error(
        server.create(bad).await,
        Code::InvalidArgument,
        "INVALID_LABELS",
    );
    server.stop().await;
}

#[tokio::test]
async fn errors_carry_codes_and_reasons_a_scheduler_can_act_on() {
    let server = start(vec![]).await;
    let changes = server.changes();
    let projects = server.projects();
    let scope = || {
        Some(Scope {
            project: "demo".into(),
            environment: String::new(),
        })
    };
    let mut unknown_project = create_request("deploy", "");
    unknown_project.project = "nope".into();
    // (case, the call's answer, code, reason)
    let cases: Vec<(&str, Result<(), Status>, Code, &str)> = vec![
        (
            "GetChange without an id",
            changes
                .clone()
                .get_change(pb::GetChangeRequest::default())
                .await
                .map(drop),
            Code::InvalidArgument,
            "FIELD_REQUIRED",
        ),
        (
            "GetChange of an unknown id",
            changes
                .clone()
                .get_change(pb::GetChangeRequest {
                    id: "nope".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
            Code::NotFound,
            "CHANGE_NOT_FOUND",
        ),
        (
            "GetStep of an unknown id",
            changes
                .clone()
                .get_step(pb::GetStepRequest {
                    id: "nope".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
            Code::NotFound,
            "STEP_NOT_FOUND",
        ),
        (
            "CreateChange without its fields",
            server
                .create(pb::CreateChangeRequest::default())
                .await
                .map(drop),
            Code::InvalidArgument,
            "FIELD_REQUIRED",
        ),
        (
            "CreateChange in an unknown project",
            server.create(unknown_project).await.map(drop),
            Code::NotFound,
            "PROJECT_NOT_FOUND",
        ),
        (
            "PatchProperties with an unknown op",
            projects
                .clone()
                .patch_properties(pb::PatchPropertiesRequest {
                    scope: scope(),
                    patch_json: "[{\"op\": \"jump\"}]".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
            Code::InvalidArgument,
            "INVALID_PATCH",
        ),
        (
            "GetProperties without a scope",
            projects
                .clone()
                .get_properties(pb::GetPropertiesRequest::default())
                .await
                .map(drop),
            Code::InvalidArgument,
            "FIELD_REQUIRED",
        ),
        (
            "CreateProject of a code in use",
            projects
                .clone()
                .create_project(pb::CreateProjectRequest {
                    code: "demo".into(),
                    name: "again".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
            Code::AlreadyExists,
            "PROJECT_ALREADY_EXISTS",
        ),
        (
            "CreateEnvironment of a code in use in its project",
            projects
                .clone()
                .create_environment(pb::CreateEnvironmentRequest {
                    project: "demo".into(),
                    code: "dev".into(),
                    name: "again".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
            Code::AlreadyExists,
            "ENVIRONMENT_ALREADY_EXISTS",
        ),
    ];
    let cases = cases
        .into_iter()
        .map(|(case, answer, code, reason)| (case, (answer, code, reason)));
    support::each_case(cases, |(answer, code, expected)| {
        assert_error(answer, code, expected);
    });
    // The errors that say more than their reason.
    let status = assert_error(
        server.create(create_request("zz", "")).await,
        Code::InvalidArgument,
        "ACTION_NOT_FOUND",
    );
    assert_eq!(
        status
            .get_error_details()
            .bad_request()
            .unwrap()
            .field_violations[0]
            .field,
        "action"
    );
    let current = projects
        .clone()
        .set_properties(pb::SetPropertiesRequest {
            scope: scope(),
            document_json: "{}".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .version;
    let status = assert_error(
        projects
            .clone()
            .set_properties(pb::SetPropertiesRequest {
                scope: scope(),
                document_json: "{}".into(),
                if_version: Some(0),
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
        "VERSION_CONFLICT",
    );
    let details = status.get_error_details();
    assert_eq!(
        details.error_info().unwrap().metadata["current_version"],
        current.to_string()
    );
    assert_eq!(
        details.precondition_failure().unwrap().violations[0].description,
        format!("the current version is {current}")
    );
    server.stop().await;
}

#[tokio::test]
async fn a_patch_retried_with_its_request_id_applies_once() {
    let server = start(vec![]).await;
    let patch = || pb::PatchPropertiesRequest {
        scope: Some(Scope {
            project: "demo".into(),
            environment: "dev".into(),
        }),
        patch_json: json!([{"op": "add", "path": "/n", "value": 1}]).to_string(),
        request_id: "patch-1".into(),
        ..Default::default()
    };
    let first = server
        .projects()
        .patch_properties(patch())
        .await
        .unwrap()
        .into_inner();
    let again = server
        .projects()
        .patch_properties(patch())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first, again);
    let history = server
        .projects()
        .properties_history(pb::PropertiesHistoryRequest {
            scope: patch().scope,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        history.versions.len(),
        first.version as usize,
        "one version per applied patch"
    );
    server.stop().await;
}

// ---- step runs

use runner::grpc::pb::run_step_event::Event as R;
use runner::grpc::pb::step_runner_service_client::StepRunnerServiceClient;

fn step_request(action: &str, step_run_id: &str) -> pb::RunStepRequest {
    pb::RunStepRequest {
        git_remote: "https://git.example.com/app.git".into(),
        git_rev: "main".into(),
        action: action.into(),
        step_run_id: step_run_id.into(),
        ..Default::default()
    }
}

fn steps_at(channel: &Channel) -> StepRunnerServiceClient<Channel> {
    StepRunnerServiceClient::new(channel.clone())
}

/// Every message of a step run stream until it ends (within `limit`), and how it ended.
async fn drain(
    mut stream: tonic::Streaming<pb::RunStepEvent>,
    limit: Duration,
) -> (Vec<pb::RunStepEvent>, Result<(), Status>) {
    let mut events = vec![];
    loop {
        match tokio::time::timeout(limit, stream.message())
            .await
            .expect("the stream ends by itself")
        {
            Ok(Some(event)) => events.push(event),
            Ok(None) => return (events, Ok(())),
            Err(status) => return (events, Err(status)),
        }
    }
}

fn result_of(events: &[pb::RunStepEvent]) -> pb::RunStepResult {
    match events.last().and_then(|e| e.event.clone()) {
        Some(R::Result(result)) => result,
        other => panic!("no result at the end: {other:?} in {events:?}"),
    }
}

#[tokio::test]
async fn a_step_run_survives_its_callers_disconnect_and_is_watched_to_its_result_after_reconnecting(
) {
    let server = start(vec![(
        "slow",
        Script {
            output: vec!["started".into()],
            delay: Duration::from_millis(1500),
            result: Some(json!({
                "environment": {"properties_diff": [{"op": "add", "path": "/v", "value": 2}]},
                "steps": {"children": [{"action": "a"}], "child_execution_strategy": "parallel"}
            })),
            ..Default::default()
        },
    )])
    .await;
    let mut stream = steps_at(&server.channel)
        .run_step(step_request("slow", "run-1"))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().expect("a first event");
    assert_eq!(first.step_run_id, "run-1");
    assert_eq!(first.seq, 1);
    drop(stream); // the scheduler goes away
                  // … and comes back on a new connection.
    let channel = channel_to(server.addr);
    let run = steps_at(&channel)
        .get_step_run(pb::GetStepRunRequest {
            step_run_id: "run-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(run.state(), pb::StepRunState::Running, "{run:?}");
    let watch = steps_at(&channel)
        .watch_step_run(pb::WatchStepRunRequest {
            step_run_id: "run-1".into(),
            after_seq: first.seq,
        })
        .await
        .unwrap()
        .into_inner();
    let (rest, end) = drain(watch, Duration::from_secs(10)).await;
    end.unwrap();
    let seqs: Vec<i64> = rest.iter().map(|e| e.seq).filter(|s| *s > 0).collect();
    assert_eq!(
        seqs,
        (2..2 + seqs.len() as i64).collect::<Vec<_>>(),
        "resumed after seq 1, no gap"
    );
    assert!(rest
        .iter()
        .any(|e| matches!(&e.event, Some(R::Log(l)) if l.line == "started")));
    let result = result_of(&rest);
    assert_eq!(result.outcome(), pb::StepRunOutcome::Succeeded);
    assert_eq!(result.patches.len(), 1);
    assert_eq!(result.patches[0].scope(), pb::PatchScope::Environment);
    let children = result.children.clone().unwrap();
    assert_eq!(children.actions, ["a"]);
    assert_eq!(children.strategy(), pb::ChildrenStrategy::Parallel);
    // Kept after its end: Get answers the same result, with its duration.
    let ended = steps_at(&channel)
        .get_step_run(pb::GetStepRunRequest {
            step_run_id: "run-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ended.state(), pb::StepRunState::Ended);
    assert_eq!(ended.outcome(), pb::StepRunOutcome::Succeeded);
    assert_eq!(ended.result, Some(result));
    assert!(ended.duration.unwrap().seconds >= 1);
    assert!(ended.end_time.is_some() && ended.create_time.is_some());
    server.stop().await;
}

#[tokio::test]
async fn cancel_on_disconnect_ties_a_run_to_its_call() {
    let server = start(vec![(
        "slow",
        Script {
            output: vec!["started".into()],
            delay: Duration::from_secs(30),
            ..Default::default()
        },
    )])
    .await;
    let mut request = step_request("slow", "tied");
    request.cancel_on_disconnect = true;
    let mut stream = steps_at(&server.channel)
        .run_step(request)
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().expect("a first event");
    drop(stream);
    let watch = steps_at(&server.channel)
        .watch_step_run(pb::WatchStepRunRequest {
            step_run_id: "tied".into(),
            after_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let (events, end) = drain(watch, Duration::from_secs(10)).await;
    end.unwrap();
    assert_eq!(result_of(&events).outcome(), pb::StepRunOutcome::Cancelled);
    server.stop().await;
}

#[tokio::test]
async fn cancel_of_a_step_run_stops_it_and_reports_cancelled() {
    let server = start(vec![("slow", Script::sleeping(Duration::from_secs(30)))]).await;
    let mut steps = steps_at(&server.channel);
    let started = steps
        .start_step_run(step_request("slow", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(started.state(), pb::StepRunState::Running);
    let id = started.step_run_id.clone();
    let cancelling = steps
        .cancel_step_run(pb::CancelStepRunRequest {
            step_run_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(
            cancelling.state(),
            pb::StepRunState::Cancelling | pb::StepRunState::Ended
        ),
        "{cancelling:?}"
    );
    let watch = steps
        .watch_step_run(pb::WatchStepRunRequest {
            step_run_id: id.clone(),
            after_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let started_waiting = std::time::Instant::now();
    let (events, end) = drain(watch, Duration::from_secs(10)).await;
    end.unwrap();
    assert!(started_waiting.elapsed() < Duration::from_secs(10));
    assert_eq!(result_of(&events).outcome(), pb::StepRunOutcome::Cancelled);
    let run = steps
        .get_step_run(pb::GetStepRunRequest {
            step_run_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(run.state(), pb::StepRunState::Ended);
    assert_eq!(run.outcome(), pb::StepRunOutcome::Cancelled);
    // Cancelling an ended run answers it unchanged.
    let again = steps
        .cancel_step_run(pb::CancelStepRunRequest {
            step_run_id: id,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.outcome(), pb::StepRunOutcome::Cancelled);
    server.stop().await;
}

#[tokio::test]
async fn a_timed_out_or_failing_step_run_says_so() {
    let server = start(vec![
        (
            "fail",
            Script {
                exit_code: 4,
                ..Default::default()
            },
        ),
        ("hang", Script::sleeping(Duration::from_secs(30))),
    ])
    .await;
    let mut steps = steps_at(&server.channel);
    for (action, outcome) in [
        ("fail", pb::StepRunOutcome::Failed),
        ("hang", pb::StepRunOutcome::TimedOut),
    ] {
        let stream = steps
            .run_step(step_request(action, action))
            .await
            .unwrap()
            .into_inner();
        let (events, end) = drain(stream, Duration::from_secs(10)).await;
        end.unwrap();
        let result = result_of(&events);
        assert_eq!(result.outcome(), outcome, "{action}");
        if action == "fail" {
            assert_eq!(result.exit_code, 4);
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn starting_a_step_run_again_with_its_id_or_request_id_attaches_to_it() {
    let server = start(vec![("slow", Script::sleeping(Duration::from_millis(300)))]).await;
    let mut steps = steps_at(&server.channel);
    let first = steps
        .start_step_run(step_request("slow", "mine"))
        .await
        .unwrap()
        .into_inner();
    let again = steps
        .start_step_run(step_request("slow", "mine"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.step_run_id, again.step_run_id);
    let mut by_request = step_request("slow", "");
    by_request.request_id = "start-1".into();
    let a = steps
        .start_step_run(by_request.clone())
        .await
        .unwrap()
        .into_inner();
    let b = steps
        .start_step_run(by_request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.step_run_id, b.step_run_id);
    // The same ids with another request are refused.
    assert_error(
        steps.start_step_run(step_request("a", "mine")).await,
        Code::AlreadyExists,
        "STEP_RUN_ALREADY_EXISTS",
    );
    by_request.action = "a".into();
    assert_error(
        steps.start_step_run(by_request).await,
        Code::InvalidArgument,
        "REQUEST_ID_REUSED",
    );
    // Both runs ran once: each is watched to one result.
    for id in [first.step_run_id, a.step_run_id] {
        let watch = steps
            .watch_step_run(pb::WatchStepRunRequest {
                step_run_id: id,
                after_seq: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let (events, end) = drain(watch, Duration::from_secs(10)).await;
        end.unwrap();
        assert_eq!(result_of(&events).outcome(), pb::StepRunOutcome::Succeeded);
    }
    server.stop().await;
}

#[tokio::test]
async fn step_run_errors_carry_codes_and_reasons() {
    let server = start(vec![]).await;
    let mut steps = steps_at(&server.channel);
    assert_error(
        steps.start_step_run(pb::RunStepRequest::default()).await,
        Code::InvalidArgument,
        "FIELD_REQUIRED",
    );
    assert_error(
        steps.start_step_run(step_request("a", "bad id!")).await,
        Code::InvalidArgument,
        "INVALID_STEP_RUN_ID",
    );
    let mut answers = vec![];
    for context in [
        "[1]",
        "{\"project\": 1}",
        "{\"extra\": {}}",
        "{\"project\": {\"properties\": []}}",
        "{",
    ] {
        let mut request = step_request("a", "");
        request.step_context_json = context.into();
        answers.push((context, steps.start_step_run(request).await));
    }
    support::each_case(answers, |answer| {
        let status = assert_error(answer, Code::InvalidArgument, "INVALID_STEP_CONTEXT");
        assert!(
            status.message().contains("step_context_json"),
            "{}",
            status.message()
        );
    });
    assert_error(
        steps
            .get_step_run(pb::GetStepRunRequest {
                step_run_id: "nope".into(),
            })
            .await,
        Code::NotFound,
        "STEP_RUN_NOT_FOUND",
    );
    assert_error(
        steps.get_step_run(pb::GetStepRunRequest::default()).await,
        Code::InvalidArgument,
        "FIELD_REQUIRED",
    );
    let stream = steps
        .run_step(step_request("a", "done"))
        .await
        .unwrap()
        .into_inner();
    let (events, _) = drain(stream, Duration::from_secs(10)).await;
    let last = events.iter().map(|e| e.seq).max().unwrap();
    let watch = |after_seq| pb::WatchStepRunRequest {
        step_run_id: "done".into(),
        after_seq,
    };
    assert_error(
        steps.watch_step_run(watch(-1)).await,
        Code::InvalidArgument,
        "INVALID_CURSOR",
    );
    assert_error(
        steps.watch_step_run(watch(last + 1)).await,
        Code::OutOfRange,
        "CURSOR_PAST_END",
    );
    // At the end of an ended run: the result alone, at once.
    let (tail, end) = drain(
        steps
            .watch_step_run(watch(last))
            .await
            .unwrap()
            .into_inner(),
        Duration::from_secs(5),
    )
    .await;
    end.unwrap();
    assert_eq!(tail.len(), 1);
    result_of(&tail);
    // A run that fails before its step finishes ends with its error, also when watched later.
    let stream = steps
        .run_step(step_request("zz", "unknown-action"))
        .await
        .unwrap()
        .into_inner();
    let (_, end) = drain(stream, Duration::from_secs(10)).await;
    assert_error(end, Code::InvalidArgument, "ACTION_NOT_FOUND");
    let run = steps
        .get_step_run(pb::GetStepRunRequest {
            step_run_id: "unknown-action".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(run.outcome(), pb::StepRunOutcome::Failed);
    assert_eq!(run.error_reason, "ACTION_NOT_FOUND");
    server.stop().await;
}

/// Commits an action that prints, sleeps, then prints again to the demo repository.
fn add_slow_action(demo: &support::Demo) {
    let path = demo.repo.join(".opschain/actions.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    manifest["actions"]["slow_release"] =
        json!({"run": "echo slow release started && sleep 4 && echo slow release done"});
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
    support::git(&demo.repo, &["commit", "-qam", "a slow action"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_step_run_survives_its_callers_disconnect() {
    if !support::docker_available() {
        return;
    }
    let demo = support::Demo::new();
    demo.set_policy("[run_step]\nallow_file_remotes = true\n");
    add_slow_action(&demo);
    let app = App::open(demo.home.path()).await.unwrap();
    let orchestrator = runner::runtime::local(app).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(run(listener, orchestrator, Default::default(), async {
        let _ = stopped.await;
    }));
    let request = pb::RunStepRequest {
        git_remote: demo.repo.to_string_lossy().into_owned(),
        git_rev: "main".into(),
        action: "slow_release".into(),
        step_run_id: "container-run".into(),
        ..Default::default()
    };
    let mut stream = steps_at(&channel_to(addr))
        .run_step(request)
        .await
        .unwrap()
        .into_inner();
    // Wait until the step prints inside its container, then hang up.
    let mut seen;
    loop {
        let event = tokio::time::timeout(Duration::from_secs(180), stream.message())
            .await
            .expect("the step starts")
            .unwrap()
            .expect("an event before the end");
        seen = event.seq;
        if matches!(&event.event, Some(R::Log(l)) if l.line == "slow release started") {
            break;
        }
    }
    drop(stream);
    let watch = steps_at(&channel_to(addr))
        .watch_step_run(pb::WatchStepRunRequest {
            step_run_id: "container-run".into(),
            after_seq: seen,
        })
        .await
        .unwrap()
        .into_inner();
    let (rest, end) = drain(watch, Duration::from_secs(60)).await;
    end.unwrap();
    assert!(
        rest.iter()
            .any(|e| matches!(&e.event, Some(R::Log(l)) if l.line == "slow release done")),
        "the step went on after the disconnect: {rest:?}"
    );
    let result = result_of(&rest);
    assert_eq!(result.outcome(), pb::StepRunOutcome::Succeeded);
    assert_eq!(result.exit_code, 0);
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn cancel_answers_the_change_as_it_will_end() {
    let server = start(vec![("slow", Script::sleeping(Duration::from_secs(30)))]).await;
    let change = server.create(create_request("slow", "")).await.unwrap();
    // Wait until it runs.
    let mut stream = server.watch(&change.id).await;
    while let Some(event) = stream.message().await.unwrap() {
        if matches!(&event.event, Some(pb::change_event::Event::StepState(s)) if s.state() == pb::StepState::Running)
        {
            break;
        }
    }
    let cancelled = server
        .changes()
        .cancel_change(pb::CancelChangeRequest {
            id: change.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        [pb::ChangeState::Cancelling, pb::ChangeState::Cancelled].contains(&cancelled.state()),
        "not the pre-cancel snapshot: {cancelled:?}"
    );
    assert_eq!(
        server.wait_finished(&change.id).await.state(),
        pb::ChangeState::Cancelled
    );
    server.stop().await;
}

#[tokio::test]
async fn projects_and_environments_get_update_by_mask_and_delete_when_unused() {
    let server = start(vec![]).await;
    let mut projects = server.projects();
    let demo = projects
        .get_project(pb::GetProjectRequest {
            project: "demo".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(demo.name, "Demo");
    let mask = |paths: &[&str]| {
        Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        })
    };
    let renamed = projects
        .update_project(pb::UpdateProjectRequest {
            project: Some(pb::Project {
                code: "demo".into(),
                name: "Demo app".into(),
                git_remote: "ignored: not in the mask".into(),
                ..Default::default()
            }),
            update_mask: mask(&["name"]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(renamed.name, "Demo app");
    assert_eq!(
        renamed.git_remote, demo.git_remote,
        "only the masked field changed"
    );
    assert_error(
        projects
            .update_project(pb::UpdateProjectRequest {
                project: Some(demo.clone()),
                update_mask: mask(&["create_time"]),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "INVALID_UPDATE_MASK",
    );
    assert_error(
        projects
            .update_project(pb::UpdateProjectRequest {
                project: Some(demo.clone()),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "FIELD_REQUIRED",
    );
    let env = projects
        .update_environment(pb::UpdateEnvironmentRequest {
            environment: Some(pb::Environment {
                project: "demo".into(),
                code: "prod".into(),
                name: "Production".into(),
                ..Default::default()
            }),
            update_mask: mask(&["name"]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(env.name, "Production");
    let get_env = |code: &str| pb::GetEnvironmentRequest {
        project: "demo".into(),
        environment: code.into(),
    };
    assert_eq!(
        projects
            .get_environment(get_env("prod"))
            .await
            .unwrap()
            .into_inner(),
        env
    );
    // dev has a change: its history is kept, so dev stays.
    let change = server.create(create_request("deploy", "")).await.unwrap();
    server.wait_finished(&change.id).await;
    let delete_env = |code: &str| pb::DeleteEnvironmentRequest {
        project: "demo".into(),
        environment: code.into(),
        ..Default::default()
    };
    let status = assert_error(
        projects.delete_environment(delete_env("dev")).await,
        Code::FailedPrecondition,
        "ENVIRONMENT_IN_USE",
    );
    assert!(status.get_error_details().precondition_failure().is_some());
    projects
        .delete_environment(delete_env("prod"))
        .await
        .unwrap();
    assert_error(
        projects.get_environment(get_env("prod")).await,
        Code::NotFound,
        "ENVIRONMENT_NOT_FOUND",
    );
    assert_error(
        projects
            .delete_project(pb::DeleteProjectRequest {
                project: "demo".into(),
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
        "PROJECT_IN_USE",
    );
    projects
        .create_project(pb::CreateProjectRequest {
            code: "empty".into(),
            name: "Empty".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    projects
        .delete_project(pb::DeleteProjectRequest {
            project: "empty".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_error(
        projects
            .get_project(pb::GetProjectRequest {
                project: "empty".into(),
            })
            .await,
        Code::NotFound,
        "PROJECT_NOT_FOUND",
    );
    server.stop().await;
}

#[tokio::test]
async fn get_actions_returns_a_commits_action_tree() {
    use pb::get_actions_request::Source;
    let server = start(vec![]).await;
    let ask = |source: Option<Source>| pb::GetActionsRequest {
        source,
        git_rev: "main".into(),
    };
    for source in [
        Source::Project("demo".into()),
        Source::GitRemote("https://git.example.com/app.git".into()),
    ] {
        let found = server
            .changes()
            .get_actions(ask(Some(source)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(found.git_sha, "sha-main");
        assert_eq!(found.manifest_path, ".opschain/actions.json");
        let names: Vec<&str> = found.actions.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["a", "deploy", "fail", "hang", "slow"]);
        let deploy = &found.actions[1];
        assert_eq!(deploy.steps, ["a"]);
        assert!(!deploy.runs_command);
        assert_eq!(deploy.run_as(), pb::ChildrenStrategy::Sequential);
        assert_eq!(found.actions[3].timeout.unwrap().seconds, 1);
    }
    assert_error(
        server.changes().get_actions(ask(None)).await,
        Code::InvalidArgument,
        "FIELD_REQUIRED",
    );
    assert_error(
        server
            .changes()
            .get_actions(ask(Some(Source::Project("nope".into()))))
            .await,
        Code::NotFound,
        "PROJECT_NOT_FOUND",
    );
    assert_error(
        server
            .changes()
            .get_actions(ask(Some(Source::GitRemote("/srv/git/app.git".into()))))
            .await,
        Code::PermissionDenied,
        "POLICY_REFUSED",
    );
    server.stop().await;
}

#[tokio::test]
async fn states_are_enums_and_times_are_timestamps_that_round_trip() {
    let server = start(vec![]).await;
    let created = server.create(create_request("deploy", "")).await.unwrap();
    assert_ne!(created.state(), pb::ChangeState::Unspecified, "{created:?}");
    let create_time = created.create_time.expect("create_time is set");
    assert!(create_time.seconds > 1_600_000_000, "{create_time:?}");
    assert_eq!(
        created.end_time, None,
        "a change that has not ended has no end_time (absent, not empty)"
    );
    let done = server.wait_finished(&created.id).await;
    assert_eq!(done.state(), pb::ChangeState::Success);
    assert_eq!(
        done.create_time,
        Some(create_time),
        "the same instant on every read"
    );
    let (start, end) = (done.start_time.unwrap(), done.end_time.unwrap());
    let at = |t: &prost_types::Timestamp| (t.seconds, t.nanos);
    assert!(
        at(&create_time) <= at(&start) && at(&start) <= at(&end),
        "{done:?}"
    );
    // The CLI's --server mode turns the Timestamp back into the text local mode shows, and back again unchanged.
    let local = runner::grpc::convert::change_from(done.clone());
    assert!(local.created_at.ends_with('Z'), "{}", local.created_at);
    assert_eq!(runner::grpc::convert::change(local), done);
    let (events, _) = server
        .watch_to_end(pb::WatchChangeRequest {
            id: created.id.clone(),
            ..Default::default()
        })
        .await;
    let last = events.last().unwrap();
    assert!(
        matches!(&last.event, Some(pb::change_event::Event::ChangeState(s)) if s.state() == pb::ChangeState::Success),
        "{last:?}"
    );
    assert!(last.time.is_some(), "every event has its time: {last:?}");
    server.stop().await;
}

#[tokio::test]
async fn projects_and_environments_page_by_keyset_bound_to_their_request() {
    let server = start(vec![]).await;
    let mut projects = server.projects();
    server.add_projects(&["a1", "c1"]).await;
    let list = |page_token: String| pb::ListProjectsRequest {
        page_size: 2,
        page_token,
    };
    let first = projects
        .list_projects(list(String::new()))
        .await
        .unwrap()
        .into_inner();
    let codes = |ps: &[pb::Project]| ps.iter().map(|p| p.code.clone()).collect::<Vec<_>>();
    assert_eq!(codes(&first.projects), ["a1", "c1"]);
    assert!(!first.next_page_token.is_empty());
    // Created between pages: one before the cursor (not shown again), one after it (shown once).
    server.add_projects(&["b1", "z1"]).await;
    let second = projects
        .list_projects(list(first.next_page_token.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        codes(&second.projects),
        ["demo", "z1"],
        "no repeats, no shift"
    );
    assert_eq!(second.next_page_token, "", "the last page");

    // Environments of demo, one a page.
    projects
        .create_environment(pb::CreateEnvironmentRequest {
            project: "demo".into(),
            code: "qa".into(),
            name: "QA".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let envs = |project: &str, page_token: String| pb::ListEnvironmentsRequest {
        project: project.into(),
        page_size: 1,
        page_token,
    };
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = projects
            .list_environments(envs("demo", token))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.environments.len(), 1);
        seen.extend(page.environments.into_iter().map(|e| e.code));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
        // A token is bound to its request: another project's list, or ListProjects, refuses it.
        assert_error(
            projects.list_environments(envs("a1", token.clone())).await,
            Code::InvalidArgument,
            "INVALID_PAGE_TOKEN",
        );
        assert_error(
            projects.list_projects(list(token.clone())).await,
            Code::InvalidArgument,
            "INVALID_PAGE_TOKEN",
        );
    }
    assert_eq!(seen, ["dev", "prod", "qa"]);
    assert_error(
        projects.list_projects(list("not-a-token".into())).await,
        Code::InvalidArgument,
        "INVALID_PAGE_TOKEN",
    );
    assert_error(
        projects
            .list_projects(pb::ListProjectsRequest {
                page_size: -1,
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "INVALID_PAGE_SIZE",
    );
    server.stop().await;
}

#[tokio::test]
async fn keyset_pages_of_projects_and_environments_end_at_their_last_entry_and_survive_a_deleted_cursor(
) {
    for (store, database) in stores() {
        let server = match &database {
            Some(url) => options().database(url),
            None => options(),
        }
        .start()
        .await;
        let mut projects = server.projects();
        server.add_projects(&["b", "c"]).await;
        let list = |page_size: i32, page_token: &str| pb::ListProjectsRequest {
            page_size,
            page_token: page_token.into(),
        };
        let codes = |ps: &[pb::Project]| ps.iter().map(|p| p.code.clone()).collect::<Vec<_>>();
        // A page that holds exactly what is left is the last: no token to an empty page.
        let all = projects
            .list_projects(list(3, ""))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(codes(&all.projects), ["b", "c", "demo"], "{store}");
        assert_eq!(
            all.next_page_token, "",
            "{store}: a full last page has no next page"
        );
        let first = projects
            .list_projects(list(2, ""))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(codes(&first.projects), ["b", "c"], "{store}");
        assert!(!first.next_page_token.is_empty(), "{store}");
        // The page's last entry (the cursor) goes away between pages: the next page still starts after it.
        projects
            .delete_project(pb::DeleteProjectRequest {
                project: "c".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let second = projects
            .list_projects(list(2, &first.next_page_token))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(codes(&second.projects), ["demo"], "{store}");
        assert_eq!(second.next_page_token, "", "{store}");

        let envs = |page_size: i32, page_token: &str| pb::ListEnvironmentsRequest {
            project: "demo".into(),
            page_size,
            page_token: page_token.into(),
        };
        let names = |es: &[pb::Environment]| es.iter().map(|e| e.code.clone()).collect::<Vec<_>>();
        let all = projects
            .list_environments(envs(2, ""))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(names(&all.environments), ["dev", "prod"], "{store}");
        assert_eq!(
            all.next_page_token, "",
            "{store}: a full last page has no next page"
        );
        let first = projects
            .list_environments(envs(1, ""))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(names(&first.environments), ["dev"], "{store}");
        projects
            .delete_environment(pb::DeleteEnvironmentRequest {
                project: "demo".into(),
                environment: "dev".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let second = projects
            .list_environments(envs(1, &first.next_page_token))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(names(&second.environments), ["prod"], "{store}");
        assert_eq!(second.next_page_token, "", "{store}");
        server.stop().await;
    }
}

#[tokio::test]
async fn project_environment_and_properties_times_are_timestamps_that_round_trip() {
    let server = start(vec![]).await;
    let mut projects = server.projects();
    let project = projects
        .create_project(pb::CreateProjectRequest {
            code: "timed".into(),
            name: "Timed".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let create_time = project.create_time.expect("a project has its create_time");
    assert!(create_time.seconds > 1_600_000_000, "{create_time:?}");
    let read = projects
        .get_project(pb::GetProjectRequest {
            project: "timed".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        read.create_time,
        Some(create_time),
        "the same instant on every read"
    );
    let environment = projects
        .create_environment(pb::CreateEnvironmentRequest {
            project: "timed".into(),
            code: "dev".into(),
            name: "Dev".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let env_time = environment
        .create_time
        .expect("an environment has its create_time");
    let at = |t: &prost_types::Timestamp| (t.seconds, t.nanos);
    assert!(
        at(&create_time) <= at(&env_time),
        "{project:?} {environment:?}"
    );
    let listed = projects
        .list_environments(pb::ListEnvironmentsRequest {
            project: "timed".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.environments, std::slice::from_ref(&environment));
    let scope = Some(Scope {
        project: "timed".into(),
        environment: "dev".into(),
    });
    let written = projects
        .set_properties(pb::SetPropertiesRequest {
            scope: scope.clone(),
            document_json: "{\"a\": 1}".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let write_time = written
        .write_time
        .expect("a properties version has its write_time");
    assert!(
        at(&env_time) <= at(&write_time),
        "{environment:?} {written:?}"
    );
    let history = projects
        .properties_history(pb::PropertiesHistoryRequest {
            scope: scope.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .versions;
    assert!(
        history.iter().all(|v| v.write_time.is_some()),
        "every version has its time: {history:?}"
    );
    assert_eq!(
        history.iter().find(|v| v.version == written.version),
        Some(&written)
    );
    // The CLI's --server mode turns each Timestamp back into the text local mode shows, and back again unchanged.
    use runner::grpc::convert;
    let local = convert::project_from(project.clone());
    assert!(local.created_at.ends_with('Z'), "{}", local.created_at);
    assert_eq!(convert::project(local), project);
    let local = convert::environment_from(environment.clone());
    assert!(local.created_at.ends_with('Z'), "{}", local.created_at);
    assert_eq!(convert::environment(local), environment);
    let local = convert::properties_from(written.clone());
    assert!(local.written_at.ends_with('Z'), "{}", local.written_at);
    assert_eq!(convert::properties(local), written);
    server.stop().await;
}
