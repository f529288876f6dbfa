//! `start --metrics 127.0.0.1:9090`: the node's status in the Prometheus
//! text format at `/metrics`. A tiny HTTP/1.1 responder (one request per
//! connection, bounded reads) over tokio: enough for a scraper, and no web
//! framework for one page.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::status::NodeStatus;

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
    metric("blossom_rejected_messages_total", "counter", "Messages that failed validation.", status.rejected as f64);
    let _ = writeln!(page, "# HELP blossom_rejected_by_reason_total Messages that failed validation, by the check that failed.\n# TYPE blossom_rejected_by_reason_total counter");
    for (reason, count) in &status.rejected_by_reason {
        let _ = writeln!(page, "blossom_rejected_by_reason_total{{run=\"{}\",peer=\"{}\",reason=\"{reason}\"}} {count}", status.run_id, status.peer_id);
    }
    page
}

/// Binds `addr` and serves the shared status until the process ends;
/// returns the bound address (port 0 picks one).
pub async fn serve(addr: SocketAddr, status: Arc<Mutex<NodeStatus>>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        // Runs for the life of the node; each connection is handled and closed.
        loop {
            let Ok((mut socket, _)) = listener.accept().await else { continue };
            let status = status.clone();
            tokio::spawn(async move {
                let mut request = vec![0u8; 4096];
                let read = match tokio::time::timeout(std::time::Duration::from_secs(5), socket.read(&mut request)).await {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
                let first_line = String::from_utf8_lossy(&request[..read]).lines().next().unwrap_or_default().to_owned();
                let (code, body) = if first_line.starts_with("GET /metrics ") {
                    ("200 OK", status.lock().map(|s| render(&s)).unwrap_or_default())
                } else {
                    ("404 Not Found", "try GET /metrics\n".to_owned())
                };
                let response = format!(
                    "HTTP/1.1 {code}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    Ok(bound)
}
