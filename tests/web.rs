//! The web view over HTTP against a real `runner serve --http`: authentication (token login, session cookie,
//! CSRF, bearer for scrapers, refusal off loopback without a token), pages, and `/metrics` after a real change.

mod support;
#[path = "support/web.rs"]
mod web_support;

use std::time::Duration;
use web_support::{request, Server, TOKEN};

#[test]
fn serving_the_web_view_off_loopback_without_a_token_is_refused() {
    let demo = support::Demo::new();
    let out = demo.run(&[
        "serve",
        "--listen",
        &format!("127.0.0.1:{}", web_support::free_port()),
        "--http",
        &format!("0.0.0.0:{}", web_support::free_port()),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("without a token") && stderr.contains("--token-file"),
        "{stderr}"
    );
    // A blank token is no token.
    let blank = demo.home.path().join("blank");
    std::fs::write(&blank, " \n").unwrap();
    let out = demo.run(&[
        "serve",
        "--listen",
        &format!("127.0.0.1:{}", web_support::free_port()),
        "--http",
        &format!("0.0.0.0:{}", web_support::free_port()),
        "--token-file",
        blank.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("blank token"));
}

#[test]
fn a_request_without_the_session_cookie_is_refused() {
    let server = Server::start(Some(TOKEN));
    let port = server.http;
    for path in [
        "/changes",
        "/projects",
        "/projects/demo/properties",
        "/changes/x/events",
    ] {
        let answer = request(port, "GET", path, &[], "");
        assert_eq!(answer.status, 401, "{path}: {answer:?}");
        assert!(
            answer.body.contains("name=\"token\""),
            "{path}: the login form"
        );
        assert!(!answer.body.contains("demo-repo"), "{path}");
    }
    // A forged or stale cookie is no session either.
    let answer = request(
        port,
        "GET",
        "/projects",
        &[("Cookie", "runner_session=0123456789abcdef")],
        "",
    );
    assert_eq!(answer.status, 401);
    let answer = request(port, "POST", "/changes/x/cancel", &[], "csrf=x");
    assert_eq!(answer.status, 401);
    // A wrong token is refused; the right one gives a Secure, HttpOnly, SameSite=Strict session.
    let answer = request(port, "POST", "/login", &[], "token=nope&next=%2F");
    assert_eq!(answer.status, 401);
    assert!(answer.header("set-cookie").is_none());
    let answer = request(
        port,
        "POST",
        "/login",
        &[],
        &format!("token={TOKEN}&next=%2Fprojects"),
    );
    assert_eq!(answer.status, 303);
    assert_eq!(answer.header("location"), Some("/projects"));
    let cookie = answer.header("set-cookie").unwrap();
    for attribute in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    // Only paths on this server are followed after login.
    let answer = request(
        port,
        "POST",
        "/login",
        &[],
        &format!("token={TOKEN}&next=%2F%2Fevil.example"),
    );
    assert_eq!(answer.header("location"), Some("/"));
    let session = server.login();
    let answer = request(port, "GET", "/projects", &[("Cookie", &session)], "");
    assert_eq!(answer.status, 200);
    assert!(answer.body.contains("demo-repo"), "{}", answer.body);
}

#[test]
fn state_changing_forms_need_the_sessions_csrf_token_and_same_origin() {
    let server = Server::start(Some(TOKEN));
    let port = server.http;
    let session = server.login();
    // A change that exists, so the only reason to refuse is the form.
    let id = server.create("dev", "fail");
    server.wait_final(&id, Duration::from_secs(120));
    let page = request(
        port,
        "GET",
        &format!("/changes/{id}"),
        &[("Cookie", &session)],
        "",
    );
    assert_eq!(page.status, 200);
    let csrf = page
        .body
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the retry form carries a CSRF token")
        .to_owned();
    let retry = format!("/changes/{id}/retry");
    for (body, origin) in [
        ("".to_owned(), None),
        ("csrf=forged".to_owned(), None),
        (format!("csrf={csrf}"), Some("http://evil.example")),
    ] {
        let mut headers = vec![("Cookie", session.as_str())];
        if let Some(origin) = origin {
            headers.push(("Origin", origin));
        }
        let answer = request(port, "POST", &retry, &headers, &body);
        assert_eq!(answer.status, 403, "{body} {origin:?}: {answer:?}");
    }
    assert_eq!(
        server.show(&id)["change"]["state"],
        "error",
        "nothing was retried"
    );
    // Another session's token is not this one's.
    let other = server.login();
    let answer = request(
        port,
        "POST",
        &retry,
        &[("Cookie", &other)],
        &format!("csrf={csrf}"),
    );
    assert_eq!(answer.status, 403);
    // The right one retries.
    let origin = format!("http://127.0.0.1:{port}");
    let answer = request(
        port,
        "POST",
        &retry,
        &[("Cookie", &session), ("Origin", &origin)],
        &format!("csrf={csrf}"),
    );
    assert_eq!(answer.status, 303, "{answer:?}");
    let again = server.wait_final(&id, Duration::from_secs(120));
    assert_eq!(again["change"]["state"], "error");
}

#[test]
fn without_a_token_only_loopback_host_names_are_answered() {
    let server = Server::start(None);
    let answer = request(server.http, "GET", "/changes", &[], "");
    assert_eq!(answer.status, 200);
    assert!(answer
        .header("set-cookie")
        .is_some_and(|c| c.contains("HttpOnly")));
    let answer = request(
        server.http,
        "GET",
        "/changes",
        &[("Host", "rebound.example:8080")],
        "",
    );
    assert_eq!(answer.status, 421);
    // No session: a form posted from elsewhere has no CSRF token to give.
    let answer = request(server.http, "POST", "/changes/x/cancel", &[], "csrf=");
    assert_eq!(answer.status, 403);
}

#[test]
fn pages_refuse_bad_input_with_a_message_that_says_what_to_use() {
    let server = Server::start(None);
    let port = server.http;
    for (path, status, says) in [
        ("/changes?state=done", 400, "use one of pending"),
        ("/changes?page=0", 400, "page number from 1"),
        ("/changes/nope", 404, "does not exist"),
        ("/steps/nope", 404, "does not exist"),
        ("/projects/nope/properties", 404, "does not exist"),
        (
            "/projects/demo/environments/nope/properties",
            404,
            "does not exist",
        ),
        (
            "/projects/demo/properties?from=99",
            400,
            "use a version from 1",
        ),
        (
            "/projects/demo/properties?to=x",
            400,
            "use a version from 1",
        ),
        ("/no/such/page", 404, "no such page"),
    ] {
        let answer = request(port, "GET", path, &[], "");
        assert_eq!(answer.status, status, "{path}: {}", answer.body);
        assert!(answer.body.contains(says), "{path}: {}", answer.body);
    }
    let answer = request(
        port,
        "GET",
        &format!("/changes/states?ids={}", vec!["a"; 101].join(",")),
        &[],
        "",
    );
    assert_eq!(answer.status, 400);
}

#[test]
fn health_and_readiness_answer_without_a_session() {
    let server = Server::start(Some(TOKEN));
    let answer = request(server.http, "GET", "/healthz", &[], "");
    assert_eq!((answer.status, answer.body.trim()), (200, "ok"));
    let answer = request(server.http, "GET", "/readyz", &[], "");
    assert_eq!(answer.status, 200);
    assert!(answer.body.contains("store: ok") && answer.body.contains("docker: ok"));
}

/// The value of one sample line of a Prometheus text page.
fn sample(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name_and_labels} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn metrics_after_a_change_count_its_steps_images_and_states() {
    if !support::docker_available() {
        return;
    }
    let server = Server::start(Some(TOKEN));
    let port = server.http;
    // Scrapers send the token; without it the page is refused.
    assert_eq!(request(port, "GET", "/metrics", &[], "").status, 401);
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("Authorization", bearer.as_str())];
    let id = server.create("dev", "deploy");
    let shown = server.wait_final(&id, Duration::from_secs(300));
    assert_eq!(shown["change"]["state"], "success");
    let steps = shown["steps"].as_array().unwrap();
    let leaves: Vec<&serde_json::Value> = steps
        .iter()
        .filter(|s| !steps.iter().any(|c| c["parent_id"] == s["id"]))
        .collect();
    let cached = leaves.iter().filter(|s| s["image_cached"] == true).count() as f64;
    let built = leaves.iter().filter(|s| s["image_cached"] == false).count() as f64;
    let durations: f64 = steps
        .iter()
        .map(|s| {
            let t = |k: &str| chrono::DateTime::parse_from_rfc3339(s[k].as_str().unwrap()).unwrap();
            (t("finished_at") - t("started_at")).num_milliseconds() as f64 / 1000.0
        })
        .sum();
    // The counters follow events: give the last one a moment to be counted.
    let mut text = String::new();
    for _ in 0..50 {
        text = request(port, "GET", "/metrics", &auth, "").body;
        if sample(&text, "runner_step_duration_seconds_count") == steps.len() as f64 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(sample(&text, "runner_changes{state=\"success\"}"), 1.0);
    assert_eq!(sample(&text, "runner_changes{state=\"running\"}"), 0.0);
    assert_eq!(
        sample(&text, "runner_step_duration_seconds_count"),
        steps.len() as f64
    );
    let sum = sample(&text, "runner_step_duration_seconds_sum");
    assert!(
        (sum - durations).abs() < 0.01 * steps.len() as f64,
        "{sum} vs {durations}"
    );
    assert_eq!(
        sample(&text, "runner_step_duration_seconds_bucket{le=\"+Inf\"}"),
        steps.len() as f64
    );
    assert_eq!(
        sample(&text, "runner_steps_finished_total{state=\"success\"}"),
        steps.len() as f64
    );
    assert_eq!(sample(&text, "runner_image_builds_total"), built);
    assert_eq!(sample(&text, "runner_image_cache_hits_total"), cached);
    assert_eq!(
        built + cached,
        leaves.len() as f64,
        "every leaf step had an image"
    );
    assert_eq!(sample(&text, "runner_queue_wait_seconds_count"), 1.0);
    assert_eq!(sample(&text, "runner_running_containers"), 0.0);
    assert!(
        sample(&text, "runner_leases") >= 1.0,
        "the server holds a lease"
    );
    assert!(
        sample(
            &text,
            "runner_http_requests_total{route=\"/metrics\",method=\"GET\",status=\"401\"}"
        ) >= 1.0
    );
    // The change was created over gRPC: one call to CreateChange (the CLI's `--server`).
    assert_eq!(
        sample(
            &text,
            "runner_grpc_calls_total{method=\"/runner.v1.ChangeService/CreateChange\"}"
        ),
        1.0
    );
}

#[test]
fn bench_web_prints_render_time_beside_its_yardstick() {
    let home = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_runner"))
        .args(["bench", "web", "--changes", "120", "--runs", "2"])
        .env("RUNNER_HOME", home.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("120 changes stored"), "{stdout}");
    let rows: Vec<&str> = stdout.lines().filter(|l| l.contains('×')).collect();
    assert_eq!(rows.len(), 3, "{stdout}");
    for row in rows {
        assert!(
            row.contains(" ms") && (row.ends_with("met") || row.ends_with("MISSED")),
            "{row}"
        );
    }
}

#[test]
fn json_logs_carry_the_change_and_step_ids_of_what_they_say() {
    if !support::docker_available() {
        return;
    }
    let demo = support::Demo::new();
    let (grpc, http) = (web_support::free_port(), web_support::free_port());
    let log = demo.home.path().join("json.log");
    let mut server = demo
        .command(&[
            "serve",
            "--listen",
            &format!("127.0.0.1:{grpc}"),
            "--http",
            &format!("127.0.0.1:{http}"),
            "--log-format",
            "json",
        ])
        .env_remove("RUNNER_LOG")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", http)).is_err()
        || request(http, "GET", "/readyz", &[], "").status != 200
    {
        assert!(std::time::Instant::now() < deadline, "serve got ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    let server_url = format!("http://127.0.0.1:{grpc}");
    let mut args = vec!["--server", server_url.as_str()];
    args.extend(support::create_args("dev", "fail", &[]));
    let out = demo.run(&args);
    assert!(!out.status.success(), "the fail action fails");
    let id = demo.last_change();
    let steps = demo.json(&["change", "show", &id])["steps"].clone();
    let step_id = steps[0]["id"].as_str().unwrap().to_owned();
    unsafe {
        libc::kill(server.id() as i32, libc::SIGTERM);
    }
    server.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: not JSON: {l}")))
        .collect();
    let about_change: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["fields"]["change_id"] == id.as_str())
        .collect();
    assert!(
        about_change
            .iter()
            .any(|l| l["fields"]["state"] == "error" && l["fields"]["step_id"].is_null()),
        "the change's end is logged with its id: {text}"
    );
    let about_step: Vec<&&serde_json::Value> = about_change
        .iter()
        .filter(|l| l["fields"]["step_id"] == step_id.as_str())
        .collect();
    assert!(
        about_step.iter().any(|l| l["fields"]["state"] == "running")
            && about_step.iter().any(|l| l["fields"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("exit code 3")),
        "the step's lines carry both ids: {text}"
    );
    // Every line that names a step names its change too.
    for line in &lines {
        if !line["fields"]["step_id"].is_null() {
            assert!(!line["fields"]["change_id"].is_null(), "{line}");
        }
    }
}

/// The text of the `<pre>` with this id.
fn pre(body: &str, id: &str) -> String {
    body.split(&format!("id=\"{id}\""))
        .nth(1)
        .and_then(|rest| rest.split("</pre>").next())
        .unwrap_or_else(|| panic!("no #{id} in {body}"))
        .to_owned()
}

#[test]
fn the_step_page_shows_its_log_and_its_services_log_apart() {
    if !support::docker_available() {
        return;
    }
    let server = Server::start(Some(TOKEN));
    let session = server.login();
    let id = server.create("dev", "with_service");
    let shown = server.wait_final(&id, Duration::from_secs(180));
    assert_eq!(shown["change"]["state"], "success", "{shown}");
    let step = shown["steps"][0]["id"].as_str().unwrap();
    let page = request(
        server.http,
        "GET",
        &format!("/steps/{step}"),
        &[("Cookie", &session)],
        "",
    );
    assert_eq!(page.status, 200);
    let (log, services) = (pre(&page.body, "log"), pre(&page.body, "service-log"));
    assert!(
        log.contains("hello-from-web") && !log.contains("[service "),
        "{log}"
    );
    assert!(
        services.contains("[service web] web is starting"),
        "{services}"
    );
    let image = shown["steps"][0]["image_id"].as_str().unwrap();
    assert!(page.body.contains(image), "the image reference is shown");
}
