//! `GET /dashboard`: one self-contained page (no CDN: edge hosts are often
//! offline) showing the figures live, per shard and in total, and the
//! effective settings. It polls `dashboard/stats` (the `/stats` document, also
//! served on the `--metrics` listener for it) once a second and computes rates
//! from consecutive samples in the browser, so the server keeps no history.

use axum::response::Html;

/// The page, compiled in.
const PAGE: &str = include_str!("dashboard.html");

pub async fn page() -> Html<&'static str> {
    Html(PAGE)
}
