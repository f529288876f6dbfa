//! `start --metrics 127.0.0.1:9090`: the node's status in the Prometheus
//! text format at `/metrics`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::routing::get;

use super::status::{NodeStatus, rejection_kind};

/// The page for one status.
pub fn render(status: &NodeStatus) -> String {
    let mut page = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(page, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{run=\"{}\",peer=\"{}\"}} {value}", status.run_id, status.peer_id);
    };
    metric("blossom_round", "gauge", "The round being trained or collected.", status.round as f64);
    metric("blossom_rounds", "gauge", "Rounds in the run.", status.rounds as f64);
    metric("blossom_connected_peers", "gauge", "Connected peers.", status.connected_peers.len() as f64);
    metric("blossom_agreement", "gauge", "Share of the last round's updates that trained from this node's average.", status.agreement.unwrap_or(0.0));
    metric("blossom_eval_loss", "gauge", "Eval loss of the last average.", status.last_eval_loss.map_or(f64::NAN, f64::from));
    metric("blossom_payload_sent_bytes_total", "counter", "Payload bytes published and served.", status.bytes_sent as f64);
    metric("blossom_payload_received_bytes_total", "counter", "Payload bytes received.", status.bytes_received as f64);
    metric("blossom_certified_round", "gauge", "The newest round whose average from this node is certified (-1: none yet).", status.certified.as_ref().map_or(-1.0, |c| c.round as f64));
    metric("blossom_certificate_signers", "gauge", "Contributors that signed that certificate.", status.certified.as_ref().map_or(0.0, |c| c.signers as f64));
    metric("blossom_quarantined_peers", "gauge", "Peers proven to misbehave and left out of the run.", status.quarantined.len() as f64);
    metric("blossom_rejected_messages_total", "counter", "Messages that failed validation.", status.rejected as f64);
    let _ = writeln!(page, "# HELP blossom_rejected_by_reason_total Messages that failed validation, by the check that failed.\n# TYPE blossom_rejected_by_reason_total counter");
    for (reason, count) in &status.rejected_by_reason {
        let _ = writeln!(page, "blossom_rejected_by_reason_total{{run=\"{}\",peer=\"{}\",reason=\"{reason}\"}} {count}", status.run_id, status.peer_id);
    }
    let _ = writeln!(page, "# HELP blossom_peers_by_path Connected peers, by path: direct, or through a relay.\n# TYPE blossom_peers_by_path gauge");
    for path in ["direct", "relayed"] {
        let count = status.peer_paths.values().filter(|p| p.starts_with(path)).count();
        let _ = writeln!(page, "blossom_peers_by_path{{run=\"{}\",peer=\"{}\",path=\"{path}\"}} {count}", status.run_id, status.peer_id);
    }
    let _ = writeln!(page, "# HELP blossom_quarantined Peers proven to misbehave, with the proof's kind.\n# TYPE blossom_quarantined gauge");
    for (peer, reason) in &status.quarantined {
        let _ = writeln!(page, "blossom_quarantined{{run=\"{}\",peer=\"{}\",quarantined=\"{peer}\",reason=\"{}\"}} 1", status.run_id, status.peer_id, rejection_kind(reason));
    }
    page
}

/// Binds `addr` (loopback) and serves the shared status at `/metrics` until
/// the process ends; returns the bound address (port 0 picks one).
pub async fn serve(addr: SocketAddr, status: Arc<Mutex<NodeStatus>>) -> std::io::Result<SocketAddr> {
    let page = move || async move {
        let body = status.lock().map(|s| render(&s)).unwrap_or_default();
        ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
    };
    let app = Router::new()
        .route("/metrics", get(page))
        .fallback(|| async { (StatusCode::NOT_FOUND, "try GET /metrics\n") });
    crate::http::spawn(addr, app, "metrics endpoint").await
}
