//! `runner bench web`: the server-side render time of the web view's changes page (50 changes, newest first, the
//! store query and the HTML) with N changes in the store — first page, a deep page and a state filter — beside a
//! yardstick measured in the same run on the same store: the same 50 rows read by the CLI's list query and
//! serialised as JSON (what `runner change list --output json` does). The goal is under 50 ms a page.

use std::path::Path;
use std::time::{Duration, Instant};

use super::bench::{bench_error, median};
use crate::app::App;
use crate::error::Result;
use crate::store::{ChangeFilter, NewChange};

/// The goal for one page, server-side.
const GOAL: Duration = Duration::from_millis(50);

pub async fn run(scratch: &Path, changes: usize, runs: usize) -> Result<()> {
    let home = scratch.join("home");
    let app = App::open(&home).await?;
    let project = app.create_project("bench", "Bench", None).await?;
    let mut environments = vec![];
    for code in ["dev", "prod"] {
        environments.push(app.create_environment("bench", code, code).await?);
    }
    let store = &app.store;
    let labels = Default::default();
    let filling = Instant::now();
    for i in 0..changes {
        let id = uuid::Uuid::new_v4().to_string();
        let root = uuid::Uuid::new_v4().to_string();
        store
            .create_change(&NewChange {
                id: &id,
                project_id: project.id,
                environment_id: environments[i % 2].id,
                action: "deploy",
                git_rev: "main",
                git_sha: "0123456789abcdef0123456789abcdef01234567",
                root_step_id: &root,
                owner: "bench",
                labels: &labels,
            })
            .await?;
    }
    println!(
        "web: {changes} changes stored in {:.1} s; median of {runs} renders each",
        filling.elapsed().as_secs_f64()
    );
    println!(
        "  {:<28}  {:>10}  {:>10}  {:>7}  {:>6}",
        "page of 50 changes", "render", "yardstick", "ratio", "goal"
    );
    let deep = (changes as u32 / 50).clamp(1, 100);
    for (label, state, page) in [
        ("page 1 (newest)".to_owned(), None, 1u32),
        (format!("page {deep}"), None, deep),
        ("page 1, state=pending".to_owned(), Some("pending"), 1),
    ] {
        let render = || async {
            crate::web::render_changes_page(store, None, state.map(str::to_owned), page)
                .await
                .map_err(bench_error)
        };
        let html = render().await?;
        let rows = html.matches("<tr data-change=").count();
        if rows != 50.min(changes) {
            return Err(bench_error(format!(
                "the page showed {rows} changes, not 50"
            )));
        }
        let mut rendered = Vec::with_capacity(runs);
        for _ in 0..runs {
            let start = Instant::now();
            render().await?;
            rendered.push(start.elapsed());
        }
        let filter = ChangeFilter {
            limit: 50,
            offset: (page as i64 - 1) * 50,
            ..Default::default()
        };
        let mut yardstick = Vec::with_capacity(runs);
        for _ in 0..runs {
            let start = Instant::now();
            let rows = store.list_changes(&filter).await?;
            let json = serde_json::to_string(&rows).map_err(|e| bench_error(e.to_string()))?;
            std::hint::black_box(json);
            yardstick.push(start.elapsed());
        }
        let (r, y) = (median(rendered), median(yardstick));
        println!(
            "  {:<28}  {:>7.2} ms  {:>7.2} ms  {:>6.2}×  {:>6}",
            label,
            r.as_secs_f64() * 1000.0,
            y.as_secs_f64() * 1000.0,
            r.as_secs_f64() / y.as_secs_f64().max(1e-9),
            if r < GOAL { "met" } else { "MISSED" }
        );
    }
    Ok(())
}
