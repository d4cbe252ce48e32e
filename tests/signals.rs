//! SIGTERM, SIGINT and SIGHUP are handled alike by `runner change create` (foreground) and `runner serve`: the
//! change ends `cancelled`, its action's trap runs (the agent forwards the signal), its container is removed, and
//! the process's lease is given up only after that — never while its container still runs. A client following a
//! change through `--server` that loses the server says which change and how to re-attach.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use runner::drill::{Drill, Process};
use runner::events::ChangeState;
use runner::store::Store;

const SIGNALS: [(i32, &str); 3] = [
    (libc::SIGTERM, "SIGTERM"),
    (libc::SIGINT, "SIGINT"),
    (libc::SIGHUP, "SIGHUP"),
];
const LIMIT: Duration = Duration::from_secs(120);

async fn drill() -> Option<(tempfile::TempDir, Drill)> {
    if !support::docker_available() {
        return None;
    }
    support::base_image();
    let dir = tempfile::tempdir().unwrap();
    let drill = Drill::prepare(env!("CARGO_BIN_EXE_runner").into(), dir.path())
        .await
        .expect("the fixture is set up");
    Some((dir, drill))
}

/// Containers of `change` (by the runner's label), running or not.
async fn containers_of(change: &str) -> usize {
    let docker = runner::executor::docker::connect().await.unwrap();
    docker
        .list_containers(Some(bollard::query_parameters::ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([(
                "label".to_owned(),
                vec![format!("runner.change={change}")],
            )])),
            ..Default::default()
        }))
        .await
        .unwrap()
        .len()
}

/// The newest change of the drill's store and its owner.
async fn newest(store: &Store) -> runner::store::Change {
    store
        .list_changes(&runner::store::ChangeFilter::default())
        .await
        .unwrap()
        .remove(0)
}

/// Watches `process` stop after `signal`: until it exits, its lease must be held whenever a container of `change`
/// exists. Returns what it printed and whether it succeeded.
async fn stops_in_order(
    store: &Store,
    process: &mut Process,
    owner: &str,
    change: &str,
    what: &str,
) -> (bool, String) {
    let started = Instant::now();
    let mut saw_container = false;
    loop {
        // The lease first: a container seen after a lease was seen gone outlived the lease (none is created then).
        let leased = store
            .leases()
            .await
            .unwrap()
            .iter()
            .any(|l| l.owner == owner);
        let containers = containers_of(change).await;
        saw_container |= containers > 0;
        assert!(
            leased || containers == 0,
            "{what}: the lease was given up while {containers} container(s) of change {change} still existed"
        );
        if started.elapsed() > LIMIT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Some(done) = process.exited().await.unwrap() {
            assert_eq!(containers_of(change).await, 0, "{what}: container left");
            assert!(
                !store
                    .leases()
                    .await
                    .unwrap()
                    .iter()
                    .any(|l| l.owner == owner),
                "{what}: the lease is given up at the end"
            );
            assert!(
                saw_container,
                "{what}: the step's container was seen running"
            );
            return (done.success, done.transcript);
        }
    }
    panic!(
        "{what}: it did not stop within {LIMIT:?}:\n{}",
        process.transcript()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn change_create_in_the_foreground_cancels_on_sigterm_sigint_and_sighup_alike() {
    let Some((_dir, drill)) = drill().await else {
        return;
    };
    let store = Store::open(drill.home()).await.unwrap();
    for (signal, name) in SIGNALS {
        let mut run = drill
            .runner()
            .start(&Drill::create_args("slow"), None)
            .unwrap();
        run.wait_for("drill sleeping", LIMIT).await.unwrap();
        let change = newest(&store).await;
        let owner = change.owner.clone().expect("a running change has an owner");
        run.signal(signal).unwrap();
        let (success, transcript) =
            stops_in_order(&store, &mut run, &owner, &change.id, name).await;
        assert!(!success, "{name}: a cancelled change exits non-zero");
        let ended = store.change(&change.id).await.unwrap();
        assert_eq!(ended.state, ChangeState::Cancelled, "{name}: {transcript}");
        assert!(
            transcript.contains(&format!("{name}: cancelling change {}", change.id)),
            "{name}: it says what it does: {transcript}"
        );
        assert!(
            transcript.contains("slow caught SIGTERM") && transcript.contains("slow cleaned up"),
            "{name}: the action's trap ran to its end: {transcript}"
        );
    }
    drill.clean_up().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_cancels_after_its_grace_on_sigterm_sigint_and_sighup_alike() {
    let Some((_dir, drill)) = drill().await else {
        return;
    };
    let store = Store::open(drill.home()).await.unwrap();
    for (signal, name) in SIGNALS {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listen = format!("127.0.0.1:{port}");
        let mut serve = drill
            .runner()
            .start(&["serve", "--listen", &listen, "--grace", "2s"], None)
            .unwrap();
        let server = format!("http://{listen}");
        let mut args = vec!["--server", server.as_str()];
        args.extend(Drill::create_args("slow"));
        let deadline = Instant::now() + LIMIT;
        let mut follower = loop {
            let mut follower = drill.runner().start(&args, None).unwrap();
            match follower.wait_for("drill sleeping", LIMIT).await {
                Ok(_) => break follower,
                // Not listening yet (or not serving until Docker answered): try again.
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(e) => panic!("{name}: following through the server: {e}"),
            }
        };
        let change = newest(&store).await;
        let owner = change.owner.clone().expect("the server owns its change");
        let signalled = Instant::now();
        serve.signal(signal).unwrap();
        let (success, transcript) =
            stops_in_order(&store, &mut serve, &owner, &change.id, name).await;
        assert!(
            success,
            "{name}: serve exits 0 after a shutdown signal: {transcript}"
        );
        assert!(
            signalled.elapsed() >= Duration::from_secs(2),
            "{name}: the running change had its grace before it was cancelled"
        );
        let ended = store.change(&change.id).await.unwrap();
        assert_eq!(ended.state, ChangeState::Cancelled, "{name}: {transcript}");
        let _ = follower.finish(Duration::from_secs(30)).await;
    }
    drill.clean_up().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_follower_that_loses_its_server_names_the_change_and_how_to_reattach() {
    let Some((_dir, drill)) = drill().await else {
        return;
    };
    let store = Store::open(drill.home()).await.unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let serve = drill
        .runner()
        .start(&["serve", "--listen", &listen], None)
        .unwrap();
    let server = format!("http://{listen}");
    let mut args = vec!["--server", server.as_str()];
    args.extend(Drill::create_args("slow"));
    let deadline = Instant::now() + LIMIT;
    let mut follower = loop {
        let mut follower = drill.runner().start(&args, None).unwrap();
        match follower.wait_for("drill sleeping", LIMIT).await {
            Ok(_) => break follower,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("following through the server: {e}"),
        }
    };
    let change = newest(&store).await;
    serve.kill9().await.unwrap();
    let done = follower
        .finish(Duration::from_secs(30))
        .await
        .expect("the follower notices its server is gone");
    assert!(!done.success);
    assert!(
        done.transcript.contains(&format!(
            "lost the server at {server} while following change {}",
            change.id
        )) && done.transcript.contains(&format!(
            "re-attach with `runner --server {server} change show-logs --follow {}`",
            change.id
        )),
        "{}",
        done.transcript
    );
    // The next runner reaps what the killed server left.
    let next = drill
        .runner()
        .run(&Drill::create_args("noop"), LIMIT)
        .await
        .unwrap();
    assert!(next.success, "{}", next.transcript);
    assert_eq!(containers_of(&change.id).await, 0);
    drill.clean_up().await.unwrap();
}
