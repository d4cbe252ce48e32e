//! The page shell (navigation, skip link, stylesheet, script) and the small pieces every page shows: state
//! badges that read without colour, durations, times.

use axum::http::StatusCode;
use maud::{html, Markup, DOCTYPE};

/// A whole page.
pub fn page(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · runner" }
                link rel="stylesheet" href="/static/style.css";
                script src="/static/app.js" defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    nav aria-label="Main" {
                        a.brand href="/" { "runner" }
                        ul {
                            li { a href="/changes" { "Changes" } }
                            li { a href="/projects" { "Projects" } }
                        }
                    }
                }
                main #main tabindex="-1" {
                    (body)
                }
            }
        }
    }
}

/// A state as a badge: a symbol and the word, so it reads without colour; `data-state` for the stylesheet and
/// the live updates.
pub fn badge(state: &str) -> Markup {
    let symbol = match state {
        "success" => "✔",
        "error" => "✘",
        "cancelled" => "⊘",
        "aborted" => "⊘",
        "running" => "▶",
        "queued" => "…",
        _ => "○",
    };
    html! {
        span.badge data-state=(state) {
            span aria-hidden="true" { (symbol) " " }
            (state)
        }
    }
}

/// Seconds between two RFC 3339 times, if both parse.
pub fn seconds_between(from: &str, to: &str) -> Option<f64> {
    let from = chrono::DateTime::parse_from_rfc3339(from).ok()?;
    let to = chrono::DateTime::parse_from_rfc3339(to).ok()?;
    Some((to - from).num_milliseconds() as f64 / 1000.0)
}

/// `1.2 s`, `3 m 04 s`, `2 h 05 m`.
pub fn duration_text(secs: f64) -> String {
    let secs = secs.max(0.0);
    if secs < 60.0 {
        format!("{secs:.1} s")
    } else if secs < 3600.0 {
        format!("{} m {:02} s", (secs / 60.0) as u64, (secs as u64) % 60)
    } else {
        format!(
            "{} h {:02} m",
            (secs / 3600.0) as u64,
            (secs as u64 / 60) % 60
        )
    }
}

/// How long something took (or has taken so far, while it runs).
pub fn duration(started: Option<&str>, finished: Option<&str>) -> Option<String> {
    let started = started?;
    let end = finished
        .map(str::to_owned)
        .unwrap_or_else(crate::store::now);
    seconds_between(started, &end).map(duration_text)
}

/// A time as stored (UTC, RFC 3339) in a `<time>` element.
pub fn time(at: &str) -> Markup {
    let shown = at.get(..19).unwrap_or(at).replace('T', " ");
    html! { time datetime=(at) { (shown) " UTC" } }
}

pub fn csrf_field(csrf: Option<&str>) -> Markup {
    html! {
        @if let Some(csrf) = csrf {
            input type="hidden" name="csrf" value=(csrf);
        }
    }
}

/// The login form (the same token as the gRPC API).
pub fn login(next: &str, problem: Option<&str>) -> Markup {
    page(
        "Log in",
        html! {
            h1 { "Log in" }
            @if let Some(problem) = problem {
                p.problem role="alert" { (problem) }
            }
            p { "Give this server's token (the one gRPC clients send)." }
            form method="post" action="/login" {
                input type="hidden" name="next" value=(next);
                label for="token" { "Token" }
                input #token type="password" name="token" autocomplete="current-password" required autofocus;
                button type="submit" { "Log in" }
            }
        },
    )
}

pub fn error_page(status: StatusCode, message: &str) -> Markup {
    page(
        status.canonical_reason().unwrap_or("Error"),
        html! {
            h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("Error")) }
            p.problem role="alert" { (message) }
            p { a href="/changes" { "Back to the changes" } }
        },
    )
}

/// JSON, pretty, escaped.
pub fn json_block(value: &serde_json::Value, label: &str) -> Markup {
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    html! { pre.json aria-label=(label) tabindex="0" { code { (text) } } }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_at_every_scale() {
        assert_eq!(duration_text(1.24), "1.2 s");
        assert_eq!(duration_text(184.0), "3 m 04 s");
        assert_eq!(duration_text(7500.0), "2 h 05 m");
        assert_eq!(
            seconds_between("2026-01-01T00:00:00.000Z", "2026-01-01T00:00:01.500Z"),
            Some(1.5)
        );
        assert_eq!(seconds_between("x", "2026-01-01T00:00:01.500Z"), None);
    }

    #[test]
    fn badges_read_without_colour() {
        let html = badge("error").into_string();
        assert!(html.contains("✘") && html.contains("error"), "{html}");
    }
}
