//! `blossom-p2p start` as a training node: the round engine over the real
//! network (TCP/QUIC, mDNS, relays), with the MLX trainer on its compute
//! thread. Prints a line per round and appends it to
//! `<data dir>/metrics.jsonl`; the averaged adapter is saved in the mlx-lm
//! format under `<data dir>/adapters/round-NNNN` every
//! `federation.save_every_rounds` rounds and after the last.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc;

use crate::config::{Config, Partitioning};
use crate::dashboard::{Dashboard, PeerRow, RoundPoint, update_if};
use crate::node::checkpoint::CheckpointFile;
use crate::node::compute::{self, ComputeSettings};
use crate::node::engine::{Engine, EngineEvent, EngineSettings, PartitionMode, RoundClock};
use crate::node::prometheus;
use crate::node::status::{CertifiedRound, NodeStatus, rejection_kind};
use crate::p2p::network::{NetworkEvent, NetworkHandle, spawn};
use crate::wire::codec::Limits;

use super::node_args::{NodeError, StartArgs, load_or_create_identity, network_options, with_peer_id};

/// Held-out rows each average is evaluated on.
const EVAL_ROWS: usize = 50;

/// Waits, up to 30 s, for a first connection when bootstrap peers are
/// given: a node that reaches none of them can never join, and says so.
async fn reach_bootstrap(events: &mut mpsc::Receiver<NetworkEvent>, handle: &NetworkHandle, bootstrap: &[String]) -> Result<(), NodeError> {
    let mut failures = Vec::new();
    let deadline = tokio::time::sleep(Duration::from_secs(30));
    tokio::pin!(deadline);
    // Bounded by the deadline and by one failure per address.
    while failures.len() < bootstrap.len() {
        tokio::select! {
            _ = &mut deadline => break,
            event = events.recv() => match event {
                Some(NetworkEvent::Listening(addr)) => println!("listening on {}", with_peer_id(addr, handle)),
                Some(NetworkEvent::PeerConnected(_)) => return Ok(()),
                Some(NetworkEvent::DialFailed { error, .. }) => failures.push(error),
                Some(_) => {}
                None => return Err(NodeError::Run("the network task stopped".into())),
            },
        }
    }
    let why = failures.last().map_or("no answer within 30 s", String::as_str);
    Err(NodeError::Run(format!(
        "could not reach any bootstrap peer ({}): {why}; check the addresses and that those peers are running",
        bootstrap.join(", ")
    )))
}

pub(crate) async fn run(config: &Config, args: &StartArgs) -> Result<(), NodeError> {
    let keypair = load_or_create_identity(&config.network.data_dir).map_err(NodeError::Input)?;
    println!("peer id: {}", keypair.public().to_peer_id());
    // Check every network flag before the model loads.
    let options = network_options(config, &args.network, &config.network.bootstrap, false)?;
    let rounds = u64::from(config.federation.rounds);
    let local_steps = u64::from(config.train.local_steps);
    let settings = ComputeSettings {
        local_steps,
        eval_rows: EVAL_ROWS,
        exact_match_rows: 0,
    };
    let prepared = compute::spawn_for_config(config, args.quant.quant, settings, rounds * local_steps).map_err(NodeError::Input)?;
    match &prepared.warm_up {
        Ok(took) => tracing::info!(seconds = took.as_secs_f64(), "warmed up: the training step, evaluation and decoding built before round 0"),
        Err(e) => tracing::warn!(error = %e, "the warm-up failed; round 0 builds what it needs"),
    }
    let result = run_node(config, args, keypair, options, &prepared).await;
    // MLX must let go of everything before the process exits.
    tokio::task::block_in_place(|| prepared.client.shutdown());
    result
}

async fn run_node(
    config: &Config,
    args: &StartArgs,
    keypair: libp2p_identity::Keypair,
    options: crate::p2p::network::NetworkOptions,
    prepared: &compute::Prepared,
) -> Result<(), NodeError> {
    let rounds = u64::from(config.federation.rounds);
    let local_steps = u64::from(config.train.local_steps);
    let run_id = match &args.run_id {
        Some(hex) => super::node_args::run_id(config, Some(hex))?,
        None => crate::node::run_id(&prepared.model_identity, &prepared.fingerprint, config),
    };
    println!(
        "run id: {run_id} (model {} on {}, data {}, {} rows to share; {} rounds of {local_steps} steps)",
        config.model.source,
        crate::mlx_env::backend().name(),
        config.data.dataset,
        prepared.train_rows.len(),
        rounds
    );
    let (handle, mut events) = spawn(keypair.clone(), options).map_err(|e| NodeError::Run(e.to_string()))?;
    if !config.network.bootstrap.is_empty() {
        reach_bootstrap(&mut events, &handle, &config.network.bootstrap).await?;
    }
    let partition = match (config.federation.partitioning, args.partition_id, args.num_partitions) {
        (_, Some(id), Some(count)) => PartitionMode::Static { id, count },
        (Partitioning::Static, _, _) => {
            return Err(NodeError::Input("federation.partitioning = \"static\" needs --partition-id K --num-partitions N".into()));
        }
        _ => PartitionMode::Hash {
            buckets: config.federation.num_buckets,
        },
    };
    let engine_settings = EngineSettings {
        run_id,
        rounds,
        method: crate::node::method(config),
        outer: crate::node::outer(config),
        compression: crate::node::compression(config),
        partition,
        fingerprint: prepared.fingerprint.clone(),
        train_rows: Arc::new(prepared.train_rows.clone()),
        clock: RoundClock::Wall {
            timeout: Duration::from_secs(config.federation.round_timeout_secs),
        },
        catch_up: args.catch_up,
        min_members: config.federation.min_members as usize,
        grace: Duration::from_secs(2),
        evaluate: true,
        save_every: config.federation.save_every_rounds,
        save_dir: Some(config.network.data_dir.join("adapters")),
        limits: Limits::default(),
        measure_drift: false,
        checkpoint: Some(CheckpointFile::new(&config.network.data_dir.join("checkpoints"), run_id, config.train.seed, local_steps)),
        examples_per_round: crate::node::examples_per_round(config),
        exchange: crate::node::exchange(config),
        replicas: config.federation.replicas as usize,
        audit: config.federation.audit,
        misbehaviour: None,
    };
    let metrics_path = config.network.data_dir.join("metrics.jsonl");
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(|e| NodeError::Input(format!("{}: {e}", metrics_path.display())))?;
    let (tx, mut reports) = mpsc::unbounded_channel();
    let peer_handle = handle.clone();
    let engine = Engine::new(handle, events, keypair, prepared.client.clone(), engine_settings, tx);
    let task = tokio::spawn(engine.run());
    let data_dir = config.network.data_dir.clone();
    let mut status = NodeStatus {
        pid: std::process::id(),
        peer_id: peer_handle.peer_id.to_string(),
        run_id: run_id.to_hex(),
        rounds,
        ..NodeStatus::default()
    };
    let shared = Arc::new(std::sync::Mutex::new(status.clone()));
    if let Some(addr) = args.metrics {
        crate::http::loopback_only(addr, "--metrics").map_err(NodeError::Input)?;
        let bound = prometheus::serve(addr, shared.clone()).await.map_err(|e| NodeError::Input(format!("--metrics {addr}: {e}")))?;
        println!("metrics on http://{bound}/metrics");
    }
    let dashboard = Dashboard::launch(args.dashboard, "node", run_id.to_hex(), rounds).await.map_err(NodeError::Input)?;
    let publish_status = |status: &mut NodeStatus| {
        let (sent, received) = peer_handle.payload_traffic();
        (status.bytes_sent, status.bytes_received) = (sent, received);
        if let Ok(mut copy) = shared.lock() {
            *copy = status.clone();
        }
        update_if(&dashboard, |view| {
            view.round = status.round;
            view.agreement = status.agreement;
            (view.bytes_sent, view.bytes_received) = (status.bytes_sent, status.bytes_received);
            view.rejected_by_reason = status.rejected_by_reason.clone();
            view.certified = status.certified.as_ref().map(ToString::to_string);
            view.quarantined = status.quarantined.clone();
            view.finished = status.finished;
        });
        if let Err(e) = status.write(&data_dir) {
            tracing::warn!(error = %e, "cannot write the status file");
        }
    };
    publish_status(&mut status);
    // Bounded by the engine: it sends `Finished` (or stops) after the last round.
    loop {
        let event = tokio::select! {
            event = reports.recv() => event,
            _ = tokio::signal::ctrl_c() => {
                // The round in progress is abandoned; the checkpoint of the
                // last finished round stays. Tell peers at once (they stop
                // counting on this node's updates), leave the status for
                // `status`, exit 0.
                println!("stopping: run the same command to resume from round {}", status.round);
                task.abort();
                let _ = peer_handle.unsubscribe(run_id).await;
                publish_status(&mut status);
                return Ok(());
            }
        };
        // The engine stopped (an error, reported below).
        let Some(event) = event else { break };
        match event {
            EngineEvent::Listening(addr) => println!("listening on {}", with_peer_id(addr, &peer_handle)),
            EngineEvent::PeerConnected(peer) => {
                tracing::info!(%peer, "connected");
                refresh_peers(&peer_handle, &mut status).await;
                publish_status(&mut status);
            }
            EngineEvent::Resumed { round } => {
                println!("resumed from the checkpoint: training round {round}");
                status.round = round;
                publish_status(&mut status);
            }
            EngineEvent::CaughtUp { round, from } => {
                println!("caught up: training from round {round} on average {from}");
                status.round = round;
                publish_status(&mut status);
            }
            EngineEvent::Rejected { peer, reason } => {
                let kind = rejection_kind(&reason);
                // Late updates of honest nodes are routine after a restart.
                if kind == "stale-round" {
                    tracing::debug!(%peer, %reason, "rejected");
                } else {
                    tracing::warn!(%peer, %reason, kind, "rejected");
                }
                status.count_rejection(&reason);
                publish_status(&mut status);
            }
            EngineEvent::Waiting { known, wanted } => println!("waiting for peers ({known} of {wanted}): round 0 starts when {wanted} nodes are here"),
            EngineEvent::Members { count, member } => {
                if member {
                    println!("round 0 starts with {count} members");
                } else {
                    println!("round 0 began before this node came: averaging it with its {count} members, training from round 1");
                }
            }
            EngineEvent::Collecting { deadline, .. } => {
                let unix_ms = deadline.and_then(|d| d.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_millis() as u64);
                update_if(&dashboard, |view| view.deadline_unix_ms = unix_ms);
            }
            EngineEvent::Round(report) => {
                // Every node starts from the same seeded adapter: agreement
                // on it says nothing, so round 0 reports none.
                let agreement = (report.round > 0).then_some(report.agreement_before);
                update_if(&dashboard, |view| {
                    view.history.push(RoundPoint {
                        round: report.round,
                        train_loss: (report.rows > 0).then_some(f64::from(report.local.loss)),
                        eval_loss: report.eval_loss.map(f64::from),
                        exact_match: None,
                        agreement,
                    });
                    view.peers = report
                        .members
                        .iter()
                        .map(|m| PeerRow {
                            peer: m.peer.to_string(),
                            round: m.newest_round,
                            rows: m.rows,
                            state: if m.peer == peer_handle.peer_id { "this node".into() } else { "member".into() },
                            path: status.peer_paths.get(&m.peer.to_string()).cloned(),
                        })
                        .collect();
                });
                status.round = report.round + 1;
                status.last_average = Some(report.average_hash.to_hex());
                status.agreement = agreement;
                status.last_eval_loss = report.eval_loss;
                refresh_peers(&peer_handle, &mut status).await;
                publish_status(&mut status);
                // The record first: a line on stdout announces a round already on disk.
                let record = json!({
                    "round": report.round,
                    "train_loss": report.local.loss,
                    "eval_loss": report.eval_loss,
                    "examples": report.local.examples,
                    "rows": report.rows,
                    "contributors": report.contributors,
                    "expected": report.expected,
                    "timed_out": report.timed_out,
                    "agreement_previous_round": agreement,
                    "average_hash": report.average_hash.to_hex(),
                    "round_seconds": report.elapsed.as_secs_f64(),
                });
                writeln!(metrics, "{record}").map_err(|e| NodeError::Run(format!("{}: {e}", metrics_path.display())))?;
                println!(
                    "round {}: train loss {:.4}, eval loss {}, {}/{} updates{}{}, average {}",
                    report.round,
                    report.local.loss,
                    report.eval_loss.map_or("-".into(), |l| format!("{l:.4}")),
                    report.contributors,
                    report.expected,
                    if report.timed_out { " (deadline)" } else { "" },
                    agreement.map_or(String::new(), |a| format!(", agreement {a:.2} on round {}'s average", report.round - 1)),
                    report.average_hash
                );
            }
            EngineEvent::Certified { round, average, signers, contributors } => {
                let certified = CertifiedRound { round, average: average.to_hex(), signers, contributors };
                println!("certified {certified}: average {average}");
                let record = json!({"certified_round": round, "average_hash": certified.average, "signers": signers, "contributors": contributors});
                writeln!(metrics, "{record}").map_err(|e| NodeError::Run(format!("{}: {e}", metrics_path.display())))?;
                status.certified = Some(certified);
                publish_status(&mut status);
            }
            EngineEvent::Quarantined { peer, reason } => {
                println!("quarantined {peer}: {reason}");
                status.quarantined.insert(peer.to_string(), reason);
                publish_status(&mut status);
            }
            EngineEvent::Finished => {
                status.finished = true;
                publish_status(&mut status);
                println!("run finished after round {}", rounds.saturating_sub(1));
                break;
            }
        }
    }
    match task.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(NodeError::Run(e.to_string())),
        Err(e) => Err(NodeError::Run(format!("the round engine stopped: {e}"))),
    }
}

/// The connected peers, and how each is reached, into the status.
async fn refresh_peers(handle: &NetworkHandle, status: &mut NodeStatus) {
    if let Ok(paths) = handle.peer_paths().await {
        status.connected_peers = paths.iter().map(|(peer, _)| peer.to_string()).collect();
        status.peer_paths = paths.iter().map(|(peer, path)| (peer.to_string(), path.to_string())).collect();
    }
}
