//! A closed round across the simulated nodes: its table row on stdout, its
//! JSONL record (with memory and store size), and the dashboard's view.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use serde_json::json;

use crate::aggregate::Tensors;
use crate::dashboard::{DashboardState, RoundPoint};
use crate::node::compute::ComputeClient;
use crate::node::engine::{RoundTrainer, agreement};
use crate::p2p::payload::PayloadKind;
use crate::wire::codec::Digest;

use super::{NodeRound, SimError};

/// A finished round across nodes.
pub(super) struct RoundRow {
    pub(super) round: u64,
    pub(super) nodes: usize,
    pub(super) train_loss: f64,
    pub(super) eval_loss: f64,
    pub(super) exact_match: Option<f64>,
    pub(super) agreement: f64,
    pub(super) sent: f64,
    pub(super) received: f64,
    /// The busiest node's bytes sent + received.
    pub(super) largest: f64,
    pub(super) seconds: f64,
    pub(super) timed_out: usize,
    pub(super) modal: (Digest, Arc<Tensors>),
}

async fn summarize(round: u64, nodes: &[NodeRound], compute: &ComputeClient, exact_match: bool) -> Result<RoundRow, SimError> {
    let hashes: Vec<Digest> = nodes.iter().map(|n| n.report.average_hash).collect();
    // Evaluate each distinct average once.
    let mut eval: HashMap<Digest, f32> = HashMap::new();
    let mut counts: BTreeMap<Digest, (usize, Arc<Tensors>)> = BTreeMap::new();
    for node in nodes {
        let entry = counts.entry(node.report.average_hash).or_insert((0, node.report.average.clone()));
        entry.0 += 1;
    }
    for (hash, (_, tensors)) in &counts {
        let loss = compute.evaluate((**tensors).clone()).await.map_err(SimError::Run)?;
        eval.insert(*hash, loss);
    }
    let (modal_hash, (_, modal)) = counts
        .iter()
        .max_by_key(|(hash, (count, _))| (*count, std::cmp::Reverse(**hash)))
        .map(|(h, v)| (*h, v.clone()))
        .ok_or_else(|| SimError::Run("a round with no reports".into()))?;
    let exact = if exact_match { Some(f64::from(compute.exact_match(Some((*modal).clone())).await.map_err(SimError::Run)?)) } else { None };
    let n = nodes.len() as f64;
    let trained: Vec<f64> = nodes.iter().filter(|x| x.report.rows > 0).map(|x| f64::from(x.report.local.loss)).collect();
    Ok(RoundRow {
        round,
        nodes: nodes.len(),
        train_loss: trained.iter().sum::<f64>() / trained.len().max(1) as f64,
        eval_loss: hashes.iter().map(|h| f64::from(eval[h])).sum::<f64>() / n,
        exact_match: exact,
        agreement: agreement(&hashes),
        sent: nodes.iter().map(|x| x.traffic.sent as f64).sum::<f64>() / n,
        received: nodes.iter().map(|x| x.traffic.received as f64).sum::<f64>() / n,
        largest: nodes.iter().map(|x| (x.traffic.sent + x.traffic.received) as f64).fold(0.0, f64::max),
        seconds: nodes.iter().map(|x| x.report.elapsed.as_secs_f64()).fold(0.0, f64::max),
        timed_out: nodes.iter().filter(|x| x.report.timed_out).count(),
        modal: (modal_hash, modal),
    })
}

pub(super) fn megabytes(bytes: f64) -> String {
    format!("{:.2} MB", bytes / 1e6)
}

/// What a node received a round: on the links, and the payload in it by
/// kind (largest first); the rest is gossipsub's copies and control
/// messages, request framing, encryption, identify, Kademlia and ping.
pub(super) fn payload_breakdown(link_received: f64, payload: &[(PayloadKind, f64)]) -> String {
    let total: f64 = payload.iter().map(|(_, bytes)| bytes).sum();
    let mut kinds: Vec<&(PayloadKind, f64)> = payload.iter().filter(|(_, bytes)| *bytes >= 1.0).collect();
    kinds.sort_by(|a, b| b.1.total_cmp(&a.1));
    let parts: Vec<String> = kinds.iter().map(|(kind, bytes)| format!("{} {:.1} KB", kind.name().replace('_', " "), bytes / 1e3)).collect();
    format!(
        "received per node per round: {} on the links; payload {} ({}); the rest (gossip copies and control, framing, encryption) {}",
        megabytes(link_received),
        megabytes(total),
        parts.join(", "),
        megabytes((link_received - total).max(0.0))
    )
}


/// The dashboard's chart and totals after the newest closed round.
pub(super) fn show_row(view: &mut DashboardState, rows: &[RoundRow]) {
    view.history = rows
        .iter()
        .map(|r| RoundPoint {
            round: r.round,
            train_loss: Some(r.train_loss),
            eval_loss: Some(r.eval_loss),
            exact_match: r.exact_match,
            agreement: Some(r.agreement),
        })
        .collect();
    view.agreement = rows.last().map(|r| r.agreement);
    view.bytes_sent = rows.iter().map(|r| r.sent).sum::<f64>() as u64;
    view.bytes_received = rows.iter().map(|r| r.received).sum::<f64>() as u64;
}

/// Summarizes a finished round and appends its record (the caller prints
/// its row, `print_row`).
pub(super) async fn close_round(
    round: u64,
    nodes: &[NodeRound],
    compute: &ComputeClient,
    exact_match: bool,
    metrics: &mut std::fs::File,
    work_dir: &Path,
) -> Result<RoundRow, SimError> {
    let row = summarize(round, nodes, compute, exact_match).await?;
    write_record(metrics, &row, nodes, work_dir)?;
    Ok(row)
}

pub(super) fn print_row(row: &RoundRow) {
    let exact = row.exact_match.map_or("-".to_owned(), |e| format!("{:.1}%", e * 100.0));
    println!(
        "{:>5} {:>5} {:>10.4} {:>9.4} {:>7} {:>9.2} {:>11} {:>11} {:>7.1}s{}",
        row.round,
        row.nodes,
        row.train_loss,
        row.eval_loss,
        exact,
        row.agreement,
        megabytes(row.sent),
        megabytes(row.received),
        row.seconds,
        if row.timed_out > 0 { format!("  ({} hit the deadline)", row.timed_out) } else { String::new() }
    );
}

/// This process's resident and peak resident memory, in MB (Linux; none elsewhere).
pub fn memory_mb() -> (Option<f64>, Option<f64>) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Bytes under `dir`, recursively.
fn disk_usage(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => disk_usage(&e.path()),
            _ => e.metadata().map(|m| m.len()).unwrap_or(0),
        })
        .sum()
}

fn write_record(out: &mut std::fs::File, row: &RoundRow, nodes: &[NodeRound], work_dir: &Path) -> Result<(), SimError> {
    let drift: Vec<f64> = nodes.iter().filter_map(|n| n.report.fedavg_drift).collect();
    let (rss, peak) = memory_mb();
    let largest_store = std::fs::read_dir(work_dir)
        .map(|entries| entries.flatten().map(|e| disk_usage(&e.path().join("store"))).max().unwrap_or(0))
        .unwrap_or(0);
    let record = json!({
        "round": row.round,
        "nodes": row.nodes,
        "train_loss": row.train_loss,
        "eval_loss": row.eval_loss,
        "exact_match": row.exact_match,
        "agreement": row.agreement,
        "bytes_sent_per_node": row.sent,
        "bytes_received_per_node": row.received,
        "bytes_largest_node": row.largest,
        "averages": nodes.iter().map(|n| (n.node.to_string(), serde_json::Value::from(n.report.average_hash.to_hex()))).collect::<serde_json::Map<String, serde_json::Value>>(),
        "round_seconds": row.seconds,
        "deadline_hits": row.timed_out,
        "average_hash": row.modal.0.to_hex(),
        "fedavg_drift": drift.first(),
        "contributors": nodes.iter().map(|n| n.report.contributors).collect::<Vec<_>>(),
        "bytes_by_node": nodes.iter().map(|n| (n.node.to_string(), serde_json::Value::from(n.traffic.sent + n.traffic.received))).collect::<serde_json::Map<String, serde_json::Value>>(),
        "slices_computed": nodes.iter().map(|n| (n.node.to_string(), serde_json::Value::from(n.report.slices_computed))).collect::<serde_json::Map<String, serde_json::Value>>(),
        "rss_mb": rss,
        "peak_rss_mb": peak,
        "largest_store_bytes": largest_store,
    });
    writeln!(out, "{record}").map_err(|e| SimError::Run(format!("metrics: {e}")))
}
