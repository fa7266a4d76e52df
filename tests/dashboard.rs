//! End to end: `GET /dashboard` in a real browser. Debian's `chromium`
//! (headless, which `.ci/run` installs), driven over the DevTools protocol,
//! loads the page from the `--metrics` listener; the page must show the
//! connections the test opened, follow them as they close, and show the
//! settings. A screenshot is kept as a test artifact.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use headless_chrome::protocol::cdp::Page::CaptureScreenshotFormatOption;
use headless_chrome::{Browser, LaunchOptions, Tab};

fn chromium() -> PathBuf {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| {
            std::env::var_os("PATH")
                .into_iter()
                .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
                .map(move |dir| dir.join(name))
        })
        .find(|p| p.is_file())
        .expect("chromium must be installed (apt-get install chromium; .ci/run does)")
}

/// The text of the element `id`, once it satisfies `want`.
fn wait_text(tab: &Tab, id: &str, timeout: Duration, want: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + timeout;
    let script = format!("document.getElementById('{id}').textContent");
    loop {
        let text = tab
            .evaluate(&script, false)
            .ok()
            .and_then(|r| r.value)
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        if want(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "#{id} shows {text:?} after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_dashboard_shows_live_figures_in_a_real_browser() {
    let server = Server::start(&["--shards", "2", "--metrics", "127.0.0.1:0"]);
    let metrics = server.metrics.expect("a metrics listener");
    let mut clients: Vec<_> = (0..7)
        .map(|_| raw_upgrade(&server, "/ws?topics=news"))
        .collect();
    let browser = Browser::new(
        LaunchOptions::default_builder()
            .path(Some(chromium()))
            .headless(true)
            .sandbox(false)
            .window_size(Some((1200, 900)))
            .idle_browser_timeout(Duration::from_secs(120))
            .build()
            .unwrap(),
    )
    .expect("launch chromium");
    let tab = browser.new_tab().unwrap();
    tab.navigate_to(&format!("http://{metrics}/dashboard"))
        .unwrap()
        .wait_until_navigated()
        .unwrap();
    assert_eq!(
        wait_text(&tab, "connections", Duration::from_secs(20), |t| t == "7"),
        "7"
    );
    // Rows per shard and the total.
    let total = wait_text(&tab, "shard-total", Duration::from_secs(5), |t| {
        t.starts_with("total7")
    });
    assert!(total.starts_with("total7"), "{total}");
    let settings = wait_text(&tab, "settings", Duration::from_secs(5), |t| !t.is_empty());
    assert!(settings.contains("\"shards\": 2"), "{settings}");
    // Deliveries show as a rate once events flow.
    for _ in 0..20 {
        server.publish("news", "{\"n\":1}");
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_text(&tab, "deliveries-rate", Duration::from_secs(10), |t| {
        t != "0" && t != "–" && !t.is_empty()
    });
    let shot = tab
        .capture_screenshot(CaptureScreenshotFormatOption::Png, None, None, true)
        .unwrap();
    let artifact = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&artifact, &shot).unwrap();
    assert!(shot.starts_with(b"\x89PNG"), "a PNG screenshot");
    eprintln!("dashboard screenshot: {}", artifact.display());
    // Four clients leave: the page follows.
    clients.truncate(3);
    assert_eq!(
        wait_text(&tab, "connections", Duration::from_secs(20), |t| t == "3"),
        "3"
    );
    // The server stops: the page says so instead of showing stale figures.
    drop(server);
    let status = wait_text(&tab, "status", Duration::from_secs(20), |t| {
        t.contains("not answering")
    });
    assert!(status.contains("not answering"), "{status}");
}
