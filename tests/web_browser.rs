//! The web view in a real headless Chromium (Debian's, driven through chromedriver by fantoccini) against a real
//! `runner serve --http` running real changes in Docker. Screenshots of the main pages go to
//! `target/web-screenshots/`.

mod support;
#[path = "support/web.rs"]
mod web_support;

use fantoccini::{Client, Locator};
use std::time::{Duration, Instant};
use web_support::{screenshot_dir, Driver, Server, TOKEN};

/// Logs in through the form (the page asked for first answers with it) and lands on `path`.
async fn logged_in(driver: &Driver, server: &Server, path: &str, width: u32) -> Client {
    let client = driver.client(width, 900).await;
    client.goto(&server.url(path)).await.unwrap();
    let token = client
        .find(Locator::Css("#token"))
        .await
        .expect("the login form");
    token.send_keys(TOKEN).await.unwrap();
    client
        .find(Locator::Css("form[action='/login'] button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until("the page after login", Duration::from_secs(10), || async {
        client.current_url().await.unwrap().path() == path.split('?').next().unwrap()
            && client.find(Locator::Css("#token")).await.is_err()
    })
    .await;
    client
}

async fn until<F, Fut>(what: &str, within: Duration, mut ready: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !ready().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An attribute of the first element `css` matches, read in one script run (the live region may be replaced
/// between two WebDriver calls).
async fn attr(client: &Client, css: &str, name: &str) -> Option<String> {
    let value = client
        .execute(
            "const e = document.querySelector(arguments[0]); return e ? e.getAttribute(arguments[1]) : null;",
            vec![css.into(), name.into()],
        )
        .await
        .ok()?;
    value.as_str().map(str::to_owned)
}

/// The rendered text of the first element `css` matches, read in one script run.
async fn text(client: &Client, css: &str) -> String {
    client
        .execute(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText : null;",
            vec![css.into()],
        )
        .await
        .unwrap()
        .as_str()
        .unwrap_or_else(|| panic!("no {css} on the page"))
        .to_owned()
}

/// Follows the link `css` matches (by its address, so a live re-render cannot make it stale).
async fn follow(client: &Client, css: &str) {
    let href = attr(client, css, "href")
        .await
        .unwrap_or_else(|| panic!("no link {css}"));
    let url = client.current_url().await.unwrap().join(&href).unwrap();
    client.goto(url.as_str()).await.unwrap();
}

/// Whether an element matches `css` now.
async fn present(client: &Client, css: &str) -> bool {
    client
        .execute(
            "return document.querySelector(arguments[0]) !== null;",
            vec![css.into()],
        )
        .await
        .unwrap()
        .as_bool()
        .unwrap()
}

async fn screenshot(client: &Client, name: &str) {
    let png = client.screenshot().await.unwrap();
    std::fs::write(screenshot_dir().join(name), png).unwrap();
}

/// The page fits the window: nothing sticks out sideways.
async fn fits_width(client: &Client) -> bool {
    client
        .execute(
            "return document.documentElement.scrollWidth <= window.innerWidth;",
            vec![],
        )
        .await
        .unwrap()
        .as_bool()
        .unwrap()
}

#[tokio::test]
async fn a_running_changes_tree_updates_live_without_reload_until_success() {
    if !support::docker_available() || !web_support::browser_available() {
        return;
    }
    let server = Server::start(Some(TOKEN));
    let driver = Driver::start();
    let id = server.create("dev", "deploy");
    let path = format!("/changes/{id}");
    let client = logged_in(&driver, &server, &path, 1280).await;
    // A marker a reload would lose.
    client
        .execute("window.notReloaded = true;", vec![])
        .await
        .unwrap();
    let mut seen = vec![];
    let mut leaves_seen_running = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let state = attr(&client, "#change-state", "data-state")
            .await
            .unwrap_or_default();
        if seen.last() != Some(&state) {
            seen.push(state.clone());
        }
        let running = client
            .execute(
                "return Array.from(document.querySelectorAll('#tree li[data-state=running]')).map(e => e.dataset.action);",
                vec![],
            )
            .await
            .unwrap();
        for action in running.as_array().into_iter().flatten() {
            leaves_seen_running.insert(action.as_str().unwrap_or("").to_owned());
        }
        if state == "success" {
            break;
        }
        assert!(Instant::now() < deadline, "the page still says {state}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kept = client
        .execute("return window.notReloaded === true;", vec![])
        .await
        .unwrap();
    assert_eq!(kept, serde_json::json!(true), "the page was reloaded");
    assert!(
        seen.iter().any(|s| s == "running") && seen.last().unwrap() == "success",
        "the page went through {seen:?}"
    );
    assert!(
        leaves_seen_running.len() >= 2,
        "steps were seen running one after another: {leaves_seen_running:?}"
    );
    // The final tree: every step succeeded, with its duration and image.
    let shown = server.show(&id);
    for step in shown["steps"].as_array().unwrap() {
        let css = format!("#step-{}", step["id"].as_str().unwrap());
        assert_eq!(
            attr(&client, &css, "data-state").await.as_deref(),
            Some("success"),
            "{css}"
        );
    }
    let release = text(&client, "li[data-action=release] .step-line").await;
    assert!(
        release.contains("success") && release.contains(" s") && release.contains("image"),
        "{release}"
    );
    let sha = text(&client, "code.sha").await;
    assert_eq!(sha, shown["change"]["git_sha"].as_str().unwrap());
    assert!(fits_width(&client).await);
    screenshot(&client, "change.png").await;

    // The step page: its log, the properties it started from and the patches it returned.
    follow(&client, "li[data-action=release] > .step-line > a").await;
    let log = client
        .wait()
        .for_element(Locator::Css("#log"))
        .await
        .unwrap();
    assert!(log.text().await.unwrap().contains("released"));
    let patched: Vec<String> = {
        let mut paths = vec![];
        for row in client
            .find_all(Locator::Css(".patch tr[data-path]"))
            .await
            .unwrap()
        {
            paths.push(row.attr("data-path").await.unwrap().unwrap());
        }
        paths
    };
    assert!(patched.contains(&"/last_release".to_owned()), "{patched:?}");
    assert!(
        patched.iter().any(|p| p.starts_with("/release")),
        "{patched:?}"
    );
    screenshot(&client, "step.png").await;

    // The list, at a desktop width and on a phone.
    client.goto(&server.url("/changes")).await.unwrap();
    let row = client
        .find(Locator::Css(&format!("tr[data-change='{id}'] .badge")))
        .await
        .unwrap();
    assert!(row.text().await.unwrap().contains("success"));
    screenshot(&client, "changes.png").await;
    client.close().await.unwrap();

    let phone = logged_in(&driver, &server, &path, 390).await;
    assert!(fits_width(&phone).await, "the change page fits a phone");
    screenshot(&phone, "change-phone.png").await;
    phone.close().await.unwrap();
}

#[tokio::test]
async fn a_failing_step_shows_its_exit_code_and_log() {
    if !support::docker_available() || !web_support::browser_available() {
        return;
    }
    let server = Server::start(Some(TOKEN));
    let driver = Driver::start();
    let id = server.create("dev", "fail");
    let client = logged_in(&driver, &server, &format!("/changes/{id}"), 1280).await;
    until("the change to fail", Duration::from_secs(120), || async {
        attr(&client, "#change-state", "data-state")
            .await
            .as_deref()
            == Some("error")
    })
    .await;
    let line = text(&client, "li[data-action=fail] .step-line").await;
    assert!(
        line.contains("exit code 3") && line.contains("error"),
        "{line}\n{}",
        server.show(&id)
    );
    assert!(
        present(&client, "#retry").await,
        "a failed change can be retried"
    );
    follow(&client, "li[data-action=fail] .step-line a").await;
    let exit = client
        .wait()
        .for_element(Locator::Css("#step-facts dd.exit"))
        .await
        .unwrap();
    assert_eq!(exit.text().await.unwrap(), "3");
    let log = client
        .find(Locator::Css("#log"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(log.contains("about to fail"), "{log}");
    let phases = client
        .find(Locator::Css("#phases"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!phases.trim().is_empty(), "the step's phases are listed");
    screenshot(&client, "step-failed.png").await;
    client.close().await.unwrap();
}

#[tokio::test]
async fn cancel_from_the_page_stops_a_running_change() {
    if !support::docker_available() || !web_support::browser_available() {
        return;
    }
    let server = Server::start(Some(TOKEN));
    let driver = Driver::start();
    let id = server.create("dev", "sleep");
    let client = logged_in(&driver, &server, &format!("/changes/{id}"), 1280).await;
    until("the step to run", Duration::from_secs(120), || async {
        attr(&client, "li[data-action=sleep]", "data-state")
            .await
            .as_deref()
            == Some("running")
    })
    .await;
    // From the keyboard: focus the button and press Enter.
    let started = Instant::now();
    // The live region may be re-rendered between finding the button and pressing it: find it again then.
    let mut pressed = false;
    for _ in 0..20 {
        if let Ok(cancel) = client.find(Locator::Css("#cancel")).await {
            if cancel.send_keys("\u{E007}").await.is_ok() {
                pressed = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(pressed, "the cancel button could be pressed");
    until(
        "the change to be cancelled",
        Duration::from_secs(40),
        || async {
            attr(&client, "#change-state", "data-state")
                .await
                .as_deref()
                == Some("cancelled")
        },
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "the 60 s sleep was stopped"
    );
    let shown = server.show(&id);
    assert_eq!(shown["change"]["state"], "cancelled");
    until("the buttons to follow", Duration::from_secs(5), || async {
        !present(&client, "#cancel").await && present(&client, "#retry").await
    })
    .await;
    client.close().await.unwrap();
}

#[tokio::test]
async fn a_property_diff_between_two_versions_shows_exactly_the_patched_paths() {
    if !web_support::browser_available() {
        return;
    }
    let demo = support::Demo::new();
    // Versions: 1 empty, 2 the fixture, 3 a document of our own, 4 = 3 patched at exactly three paths.
    let file = demo.home.path().join("props.json");
    std::fs::write(
        &file,
        r#"{"app": {"replicas": 2, "image": "app:1", "keep": [1, 2]}, "old": "x", "same": {"a": 1}}"#,
    )
    .unwrap();
    demo.ok(&[
        "project",
        "set-properties",
        "--project",
        "demo",
        "--file",
        file.to_str().unwrap(),
    ]);
    std::fs::write(
        &file,
        r#"[{"op": "replace", "path": "/app/replicas", "value": 3},
            {"op": "remove", "path": "/old"},
            {"op": "add", "path": "/app/region", "value": "eu"}]"#,
    )
    .unwrap();
    demo.ok(&[
        "project",
        "patch-properties",
        "--project",
        "demo",
        "--file",
        file.to_str().unwrap(),
    ]);
    let server = Server::start_on(demo, Some(TOKEN));
    let driver = Driver::start();
    let client = logged_in(&driver, &server, "/projects/demo/properties", 1280).await;
    client
        .find(Locator::Css("#from"))
        .await
        .unwrap()
        .select_by_value("3")
        .await
        .unwrap();
    client
        .find(Locator::Css("#to"))
        .await
        .unwrap()
        .select_by_value("4")
        .await
        .unwrap();
    client
        .find(Locator::Css("#compare"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let table = client
        .wait()
        .for_element(Locator::Css("#diff table"))
        .await
        .unwrap();
    let mut paths = vec![];
    for row in table.find_all(Locator::Css("tr[data-path]")).await.unwrap() {
        let op = row
            .find(Locator::Css(".op"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        paths.push((row.attr("data-path").await.unwrap().unwrap(), op));
    }
    paths.sort();
    assert_eq!(
        paths,
        vec![
            ("/app/region".to_owned(), "add".to_owned()),
            ("/app/replicas".to_owned(), "replace".to_owned()),
            ("/old".to_owned(), "remove".to_owned()),
        ]
    );
    let history = client
        .find(Locator::Css("#history"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(history.contains("CLI"), "who wrote each version: {history}");
    screenshot(&client, "properties.png").await;
    client.close().await.unwrap();
}

#[tokio::test]
async fn the_changes_lists_badges_follow_a_change_live() {
    if !support::docker_available() || !web_support::browser_available() {
        return;
    }
    let server = Server::start(Some(TOKEN));
    let driver = Driver::start();
    let id = server.create("dev", "sleep");
    let client = logged_in(&driver, &server, "/changes", 1280).await;
    client
        .execute("window.notReloaded = true;", vec![])
        .await
        .unwrap();
    let badge = format!("tr[data-change='{id}'] .badge");
    until(
        "the badge to say running",
        Duration::from_secs(120),
        || async { attr(&client, &badge, "data-state").await.as_deref() == Some("running") },
    )
    .await;
    // Cancelled elsewhere (the API), seen here without a reload.
    let url = format!("http://127.0.0.1:{}", server.grpc);
    server
        .demo
        .ok(&["--server", &url, "--token", TOKEN, "change", "cancel", &id]);
    until(
        "the badge to say cancelled",
        Duration::from_secs(40),
        || async { attr(&client, &badge, "data-state").await.as_deref() == Some("cancelled") },
    )
    .await;
    assert!(
        text(&client, &badge).await.contains("cancelled"),
        "the word, not only a colour"
    );
    let kept = client
        .execute("return window.notReloaded === true;", vec![])
        .await
        .unwrap();
    assert_eq!(kept, serde_json::json!(true), "the page was reloaded");
    client.close().await.unwrap();
}
