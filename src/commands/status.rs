//! `blossom-p2p status`: a running node's view of its run, read from the
//! status file it keeps in its data directory, or from a dashboard's
//! `/api/status` (`--dashboard URL`: a node's or a whole simulation's).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::config::Config;
use crate::dashboard::fetch_status;
use crate::node::status::{NodeStatus, rejection_detail};

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The node's data directory (default: network.data_dir).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Read a running node's or simulation's dashboard instead (its /api/status), e.g. http://127.0.0.1:8090.
    #[arg(long, value_name = "URL", conflicts_with = "data_dir")]
    pub dashboard: Option<String>,
    /// Print the status as JSON.
    #[arg(long)]
    pub json: bool,
}

impl StatusArgs {
    pub fn apply(&self, config: &mut Config) {
        if let Some(dir) = &self.data_dir {
            config.network.data_dir = dir.clone();
        }
    }
}

/// Prints what a dashboard's `/api/status` says.
fn from_dashboard(url: &str, json: bool) -> ExitCode {
    let (state, body) = match fetch_status(url) {
        Ok(answer) => answer,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        println!("{body}");
        return ExitCode::SUCCESS;
    }
    println!("{:<9} {} ({})", state.mode, state.run_id, if state.finished { "finished" } else { "running" });
    println!("round     {} of {}", state.round.min(state.rounds), state.rounds);
    println!("agreement {}", state.agreement.map_or("-".to_owned(), |a| format!("{a:.2}")));
    if let Some(last) = state.history.last() {
        println!("eval loss {}", last.eval_loss.map_or("-".to_owned(), |l| format!("{l:.4}")));
    }
    println!("traffic   {:.2} MB sent, {:.2} MB received", state.bytes_sent as f64 / 1e6, state.bytes_received as f64 / 1e6);
    let rejected: u64 = state.rejected_by_reason.values().sum();
    println!("rejected  {rejected} messages{}", rejection_detail(&state.rejected_by_reason));
    println!("peers     {}", state.peers.len());
    for peer in &state.peers {
        let round = peer.round.map_or("-".to_owned(), |r| r.to_string());
        let rows = peer.rows.map_or("-".to_owned(), |r| r.to_string());
        println!("          {}  round {round}  rows {rows}  {}", peer.peer, peer.state);
    }
    ExitCode::SUCCESS
}

pub fn run(config: &Config, args: &StatusArgs) -> ExitCode {
    if let Some(url) = &args.dashboard {
        return from_dashboard(url, args.json);
    }
    let status = match NodeStatus::read(&config.network.data_dir) {
        Ok(status) => status,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::FAILURE;
        }
    };
    let state = if status.finished {
        "finished"
    } else if status.alive() {
        "running"
    } else {
        "stopped (its process is gone)"
    };
    if args.json {
        let mut value = serde_json::to_value(&status).unwrap_or_default();
        value["state"] = serde_json::Value::from(state);
        println!("{value}");
    } else {
        let age = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs().saturating_sub(status.updated))
            .unwrap_or(0);
        println!("node      {} ({state}, pid {}, updated {age} s ago)", status.peer_id, status.pid);
        println!("run       {}", status.run_id);
        println!("round     {} of {}", status.round.min(status.rounds), status.rounds);
        println!("average   {}", status.last_average.as_deref().unwrap_or("none yet"));
        println!("agreement {}", status.agreement.map_or("-".to_owned(), |a| format!("{a:.2}")));
        println!("certified {}", status.certified.as_ref().map_or("none yet".to_owned(), ToString::to_string));
        for (peer, reason) in &status.quarantined {
            println!("quarantined {peer}: {reason}");
        }
        println!("eval loss {}", status.last_eval_loss.map_or("-".to_owned(), |l| format!("{l:.4}")));
        println!("traffic   {:.2} MB sent, {:.2} MB received (payload)", status.bytes_sent as f64 / 1e6, status.bytes_received as f64 / 1e6);
        println!("rejected  {} messages{}", status.rejected, rejection_detail(&status.rejected_by_reason));
        println!("peers     {}", status.connected_peers.len());
        for peer in &status.connected_peers {
            match status.peer_paths.get(peer) {
                Some(path) => println!("          {peer} ({path})"),
                None => println!("          {peer}"),
            }
        }
    }
    if state == "running" || status.finished { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
