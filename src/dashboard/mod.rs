//! The live web dashboard of `start --dashboard ADDR` and `simulate
//! --dashboard ADDR`: a page embedded in the binary (no CDN), the state as
//! JSON at `/api/status`, and every change pushed at `/api/events`
//! (server-sent events). Producers update the state through [`Dashboard`];
//! this module knows nothing of the node or the simulation.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;

use axum::Router;
use axum::http::header;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// One peer (or simulated node) as the page lists it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerRow {
    pub peer: String,
    /// The newest round it is known to have trained.
    pub round: Option<u64>,
    /// Its training rows in that round (its partition).
    pub rows: Option<usize>,
    pub state: String,
    /// How this node reaches it: `direct`, or `relayed via <relay>`.
    #[serde(default)]
    pub path: Option<String>,
}

/// One finished round on the chart.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundPoint {
    pub round: u64,
    pub train_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub exact_match: Option<f64>,
    pub agreement: Option<f64>,
}

/// Everything the page shows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DashboardState {
    /// `node` or `simulation`.
    pub mode: String,
    pub run_id: String,
    /// The round being trained or collected.
    pub round: u64,
    pub rounds: u64,
    /// When the current round's collection ends, if the clock is wall time.
    pub deadline_unix_ms: Option<u64>,
    pub peers: Vec<PeerRow>,
    pub history: Vec<RoundPoint>,
    pub agreement: Option<f64>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub rejected_by_reason: BTreeMap<String, u64>,
    /// The newest certified average, in words ("round 3 (4 of 4 contributors signed)").
    #[serde(default)]
    pub certified: Option<String>,
    /// Quarantined peers and why.
    #[serde(default)]
    pub quarantined: BTreeMap<String, String>,
    pub finished: bool,
}

/// The producer's handle: every update reaches the page at once.
#[derive(Clone)]
pub struct Dashboard {
    state: watch::Sender<DashboardState>,
}

impl Dashboard {
    pub fn new(initial: DashboardState) -> Self {
        Self { state: watch::Sender::new(initial) }
    }

    pub fn update(&self, change: impl FnOnce(&mut DashboardState)) {
        self.state.send_modify(change);
    }

    /// The dashboard of `--dashboard ADDR`, if given: checked to be on
    /// loopback (it is not authenticated), serving, and announced on stdout.
    pub async fn launch(addr: Option<SocketAddr>, mode: &str, run_id: String, rounds: u64) -> Result<Option<Dashboard>, String> {
        let Some(addr) = addr else { return Ok(None) };
        crate::http::loopback_only(addr, "--dashboard")?;
        let dashboard = Dashboard::new(DashboardState {
            mode: mode.into(),
            run_id,
            rounds,
            ..DashboardState::default()
        });
        let bound = dashboard.serve(addr).await.map_err(|e| format!("--dashboard {addr}: {e}"))?;
        println!("dashboard on http://{bound}/");
        Ok(Some(dashboard))
    }

    /// Binds `addr` and serves until the process ends; returns the bound
    /// address (port 0 picks one).
    pub async fn serve(&self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        crate::http::spawn(addr, router(self.state.subscribe()), "dashboard").await
    }
}

/// Reads a dashboard's `/api/status` (`base`: `http://host:port`), with a
/// plain HTTP/1.1 GET: what `blossom-p2p status --dashboard` shows.
pub fn fetch_status(base: &str) -> Result<(DashboardState, String), String> {
    use std::io::{Read, Write};
    let host = base
        .strip_prefix("http://")
        .map(|rest| rest.split('/').next().unwrap_or_default())
        .filter(|host| !host.is_empty())
        .ok_or_else(|| format!("--dashboard {base}: give the dashboard's address as http://HOST:PORT"))?;
    let failed = |e: std::io::Error| format!("cannot read {base}/api/status: {e}; is a node or simulation running with --dashboard?");
    let mut socket = std::net::TcpStream::connect(host).map_err(failed)?;
    socket.set_read_timeout(Some(std::time::Duration::from_secs(10))).map_err(failed)?;
    socket
        .write_all(format!("GET /api/status HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .map_err(failed)?;
    let mut response = Vec::new();
    // Bounded: at most 16 MB.
    socket.take(16 << 20).read_to_end(&mut response).map_err(failed)?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").ok_or_else(|| format!("{base}/api/status: not an HTTP answer"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("{base}/api/status answered {}", head.lines().next().unwrap_or_default()));
    }
    let state = serde_json::from_str(body).map_err(|e| format!("{base}/api/status is not a blossom-p2p dashboard: {e}"))?;
    Ok((state, body.to_owned()))
}

/// Applies `change` when there is a dashboard.
pub fn update_if(dashboard: &Option<Dashboard>, change: impl FnOnce(&mut DashboardState)) {
    if let Some(dashboard) = dashboard {
        dashboard.update(change);
    }
}

const INDEX: &str = include_str!("static/index.html");
const SCRIPT: &str = include_str!("static/app.js");
const STYLE: &str = include_str!("static/style.css");

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

fn router(state: watch::Receiver<DashboardState>) -> Router {
    let status = state.clone();
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX) }))
        .route("/app.js", get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }))
        .route("/style.css", get(|| async { asset("text/css; charset=utf-8", STYLE) }))
        .route("/api/status", get(move || async move { axum::Json(status.borrow().clone()) }))
        .route("/api/events", get(move || async move { events(state.clone()) }))
}

/// The current state at once, then each change.
fn events(mut state: watch::Receiver<DashboardState>) -> impl IntoResponse {
    state.mark_changed();
    let stream = futures::stream::unfold(state, |mut state| async move {
        // Ends when the producer is gone.
        state.changed().await.ok()?;
        let json = serde_json::to_string(&*state.borrow_and_update()).ok()?;
        Some((Ok::<Event, Infallible>(Event::default().data(json)), state))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
