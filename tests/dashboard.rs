//! The live dashboard in a real browser: a 3-node `simulate --dashboard`
//! run of the tiny model, its page loaded by headless Chromium (Debian's
//! `chromium`; skipped, saying so, when it is missing, except in CI). The
//! chart and the peer table must fill in; a screenshot is kept as a test
//! artifact. The page renders asynchronously (its script fetches
//! /api/status and listens to /api/events), so the test loads it again until
//! the rendered state is there, a bounded number of times.

mod common;

use std::path::Path;
use std::process::Command;

use common::Node;

fn chromium(args: &[&str], profile: &Path) -> std::process::Output {
    Command::new("chromium")
        .args([
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--timeout=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .expect("run chromium")
}

/// The page's script has run: mode, chart and all three peer rows are there.
fn rendered(dom: &str) -> bool {
    dom.contains("<span id=\"mode\">simulation</span>")
        && dom.contains("<path class=\"train\"")
        && dom.contains("<circle class=\"eval\"")
        && dom.matches("<td>node ").count() == 3
        && !dom.contains("data-updates=\"0\"")
}

#[test]
fn the_dashboard_fills_in_during_a_simulation() {
    if Command::new("chromium").arg("--version").output().is_err() {
        common::skip_unless_ci("no chromium");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data_dir = format!("network.data_dir=\"{}\"", dir.path().display());
    let sim = Node::spawn(&[
        "--set", "model.source=tiny", "--set", "lora.num_layers=4", "--set", &data_dir, "--set", "train.local_steps=6", "simulate",
        "--nodes", "3", "--rounds", "6", "--eval-rows", "8", "--exact-match-rows", "2", "--dashboard", "127.0.0.1:0",
    ]);
    let url = sim.wait_for("dashboard on http://").trim_start_matches("dashboard on ").to_owned();
    // Round 1 closed (table row "    1     3 ..."): there is something to draw.
    sim.wait_for("    1     3 ");

    // `--dump-dom` may return before the script has filled the page in:
    // load it again (each load is a fresh process) until it has, 20 times at most.
    let mut dom = String::new();
    for attempt in 0..20 {
        let output = chromium(&["--dump-dom", &url], &dir.path().join(format!("profile-dom-{attempt}")));
        dom = String::from_utf8_lossy(&output.stdout).into_owned();
        if rendered(&dom) {
            break;
        }
    }
    // Rendered by the page's script from /api/status and /api/events.
    assert!(dom.contains("<span id=\"mode\">simulation</span>"), "{dom}");
    assert!(dom.contains("<path class=\"train\"") && dom.contains("<circle class=\"eval\""), "the chart is drawn: {dom}");
    let rows = dom.matches("<td>node ").count();
    assert_eq!(rows, 3, "the peer table lists the 3 nodes: {dom}");
    assert!(!dom.contains("data-updates=\"0\""), "{dom}");

    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR")).join("artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let output = chromium(&["--window-size=1100,1000", &format!("--screenshot={}", shot.display()), &url], &dir.path().join("profile-shot"));
    let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("no screenshot ({e}): {}", String::from_utf8_lossy(&output.stderr)));
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a screenshot of {} bytes", png.len());
    eprintln!("screenshot: {}", shot.display());

    // The same data is at /api/status.
    let (host, _) = url.trim_start_matches("http://").split_once('/').unwrap();
    let mut socket = std::net::TcpStream::connect(host).unwrap();
    std::io::Write::write_all(&mut socket, format!("GET /api/status HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    let mut response = String::new();
    std::io::Read::read_to_string(&mut socket, &mut response).unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1;
    let status: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(status["mode"], "simulation");
    assert_eq!(status["peers"].as_array().unwrap().len(), 3);
    assert!(!status["history"].as_array().unwrap().is_empty());
    assert!(status["peers"][0]["rows"].as_u64().unwrap() > 0, "{status}");
    // `status` reads it too.
    let output = common::blossom(&["status", "--dashboard", url.trim_end_matches('/')]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("peers     3") && stdout.contains("round     "), "{stdout}");
    drop(sim);
}
