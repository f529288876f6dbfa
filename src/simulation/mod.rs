//! The simulation driver behind `blossom-p2p simulate`: N real nodes (round
//! engine, libp2p swarm, gossipsub) in one process over netsim's in-memory
//! network, sharing one loaded base model on one compute thread. Scenario
//! events (churn, partitions) fire by round; `table` turns each closed round
//! into a table row, a JSONL record and the dashboard's view; `poison` makes
//! chosen nodes attack. The command (`commands::simulate`) only parses flags.

mod poison;
mod table;

pub use poison::Attack;
pub use table::memory_mb;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::Multiaddr;
use libp2p_identity::Keypair;
use netsim::{Action, Scenario, SimNetwork, Traffic};
use poison::SimTrainer;
use serde_json::json;
use indicatif::{ProgressBar, ProgressStyle};
use table::{RoundRow, close_round, megabytes, print_row, show_row};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::dashboard::{Dashboard, PeerRow, update_if};
use crate::model::QuantMode;
use crate::node::compute::{self, ComputeClient, ComputeSettings};
use crate::node::engine::{Engine, EngineEvent, EngineSettings, PartitionMode, RoundClock, RoundReport, RoundTrainer};
use crate::node::status::{rejection_detail, rejection_kind};
use crate::p2p::network::{NetworkHandle, NetworkOptions, TransportKind, spawn};
use crate::p2p::payload::PayloadKind;
use crate::plot::{Series, plot_rounds};
use crate::rng::SeededRng;
use crate::wire::codec::{Digest, Limits};

/// Peers each node dials when it starts.
const BOOTSTRAP_PEERS: usize = 3;
/// Without a scenario timeout, simulated rounds wait at most this long for
/// missing peers (idle compute time; see RoundClock::ComputeIdle), or
/// `SIM_TIMEOUT_PER_NODE` a node when that is longer, and past
/// `SIM_LINEAR_NODES` nodes that times N / `SIM_LINEAR_NODES`: every node's
/// network work shares this process's cores, so a large network needs
/// longer for what each node does in parallel on its own machine, and the
/// reduce exchange's piece requests grow with N² in all. With 10 s, 64
/// nodes on 2 cores missed most slice owners' claims and every node computed
/// most slices itself, fetching three times the pieces; with 51 s, 128
/// nodes did the same (107 of 128 slices computed by each node).
const DEFAULT_SIM_TIMEOUT: Duration = Duration::from_secs(10);
const SIM_TIMEOUT_PER_NODE: Duration = Duration::from_millis(400);
const SIM_LINEAR_NODES: u32 = 64;

/// What a simulation does besides the configuration's nodes and rounds.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Network scenario: latency, loss, bandwidth, partitions, churn (netsim/scenarios/*.toml).
    #[arg(long, value_name = "FILE")]
    pub scenario: Option<PathBuf>,
    /// Where to write per-round metrics (JSONL); a plot goes next to it as .svg
    /// (default: <data dir>/simulate/metrics.jsonl).
    #[arg(long, value_name = "FILE")]
    pub metrics: Option<PathBuf>,
    /// Held-out rows for each round's eval loss.
    #[arg(long, default_value_t = 40)]
    pub eval_rows: usize,
    /// Test rows for exact match each round (built-in task; 0 skips it).
    #[arg(long, default_value_t = 20)]
    pub exact_match_rows: usize,
    /// Also train adapters centrally on all rows, for the run's steps and for
    /// all nodes' steps together, and compare their eval loss with the
    /// federated result.
    #[arg(long)]
    pub centralized_baseline: bool,
    /// Make the last --attackers nodes publish poisoned updates.
    #[arg(long, value_enum)]
    pub attack: Option<Attack>,
    /// How many nodes attack (the highest-numbered ones).
    #[arg(long, default_value_t = 1, requires = "attack")]
    pub attackers: u32,
    /// Serve the live web dashboard at http://ADDR/ (a loopback address); it stays up after the run until Ctrl-C.
    #[arg(long, value_name = "ADDR")]
    pub dashboard: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Run(String),
}

/// One simulated node while it runs.
struct Running {
    handle: NetworkHandle,
    task: tokio::task::JoinHandle<()>,
    client: ComputeClient,
}

/// What one node reported for a round, with its traffic during the round.
struct NodeRound {
    node: u64,
    report: RoundReport,
    traffic: Traffic,
}

struct Simulation {
    network: SimNetwork,
    run_id: Digest,
    settings: EngineSettings,
    compute: ComputeClient,
    work_dir: PathBuf,
    /// Engine events, tagged with the node and its traffic counters when
    /// the event happened.
    reports: mpsc::UnboundedSender<(u64, EngineEvent, Traffic)>,
    running: BTreeMap<u64, Running>,
    rng: SeededRng,
    seed: u64,
    store_quota: u64,
    attack: Option<Attack>,
    /// Nodes from this one on attack.
    first_attacker: u64,
    /// Traffic counters at each node's last report.
    traffic_seen: HashMap<u64, Traffic>,
    /// Each stopped node's payload over the run: sent, received, and
    /// received by kind (`PayloadKind::ALL`'s order; what tells the busiest
    /// node's bytes apart, and summed, the run's breakdown).
    payload_by_node: BTreeMap<u64, (u64, u64, [u64; PayloadKind::ALL.len()])>,
    /// How many nodes finished the oldest round still open (a round's row
    /// is printed only once every node is past it: minutes at 128 nodes).
    /// Drawn on a terminal only; lines are printed through it.
    progress: ProgressBar,
}

fn keypair(seed: u64, node: u64) -> Result<Keypair, SimError> {
    let mut secret = *blake3::hash(format!("blossom-simulate:{seed}:{node}").as_bytes()).as_bytes();
    Keypair::ed25519_from_bytes(&mut secret).map_err(|e| SimError::Run(format!("node key: {e}")))
}

impl Simulation {
    /// Prints a line of the run's report above the progress bar.
    fn say(&self, line: &str) {
        self.progress.suspend(|| println!("{line}"));
    }

    /// Shows how many of the running honest nodes are past `round`.
    fn show_progress(&self, round: u64, done: usize, running: usize) {
        self.progress.set_length(running as u64);
        self.progress.set_position(done as u64);
        self.progress.set_message(format!("round {round}"));
    }

    /// Starts node `node`; `catch_up` for late joiners and restarts.
    fn start(&mut self, node: u64, catch_up: bool) -> Result<(), SimError> {
        let live: Vec<u64> = self.running.keys().copied().filter(|n| *n != node).collect();
        let mut bootstrap = Vec::new();
        let mut candidates = live.clone();
        while bootstrap.len() < BOOTSTRAP_PEERS && !candidates.is_empty() {
            let pick = self.rng.below(candidates.len() as u64) as usize;
            bootstrap.push(SimNetwork::address(candidates.swap_remove(pick)));
        }
        let options = NetworkOptions {
            listen: vec![SimNetwork::address(node)],
            bootstrap,
            external: Vec::new(),
            mdns: false,
            relay_server: None,
            hole_punching: true,
            store_dir: self.work_dir.join(format!("node-{node:03}")).join("store"),
            store_quota: self.store_quota,
            limits: Limits::default(),
            psk: None,
            mesh_n: None,
            slice_owners: self.settings.replicas,
            transport: TransportKind::Simulated {
                network: self.network.clone(),
                node,
            },
            allowed_peers: None,
        };
        let keypair = keypair(self.seed, node)?;
        let (handle, events) = spawn(keypair.clone(), options).map_err(|e| SimError::Run(format!("node {node}: {e}")))?;
        let client = self.compute.for_slot(node);
        let mut settings = self.settings.clone();
        settings.catch_up = catch_up;
        // One node measures how far FedAvg drifts from the exact average.
        settings.measure_drift = node == 0;
        if let RoundClock::ComputeIdle { busy, .. } = &mut settings.clock {
            *busy = client.busy();
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        let attack = self.attack.filter(|_| node >= self.first_attacker);
        settings.misbehaviour = attack.and_then(Attack::misbehaviour);
        let trainer = SimTrainer {
            client: client.clone(),
            attack,
            seed: self.seed ^ node,
        };
        let engine = Engine::new(handle.clone(), events, keypair, trainer, settings, tx);
        let reports = self.reports.clone();
        let network = self.network.clone();
        let forward = move |event: EngineEvent| {
            let _ = reports.send((node, event, network.traffic(node)));
        };
        let task = tokio::spawn(async move {
            let run = engine.run();
            tokio::pin!(run);
            // Forward the engine's events tagged with the node.
            loop {
                tokio::select! {
                    result = &mut run => {
                        while let Ok(event) = rx.try_recv() {
                            forward(event);
                        }
                        if let Err(e) = result {
                            tracing::error!(node, error = %e, "node stopped");
                            forward(EngineEvent::Finished);
                        }
                        return;
                    }
                    Some(event) = rx.recv() => forward(event),
                }
            }
        });
        self.running.insert(node, Running { handle, task, client });
        Ok(())
    }

    /// Stops a node: `graceful` leaves the run's topics first.
    async fn stop(&mut self, node: u64, graceful: bool) {
        let Some(running) = self.running.remove(&node) else { return };
        if graceful {
            let _ = running.handle.unsubscribe(self.run_id).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        } else {
            self.network.cut_off(node);
        }
        running.task.abort();
        running.client.forget();
        let (sent, received) = running.handle.payload_traffic();
        let node_payload = self.payload_by_node.entry(node).or_insert((0, 0, [0; PayloadKind::ALL.len()]));
        node_payload.0 += sent;
        node_payload.1 += received;
        for (kind, bytes) in running.handle.payload_received_by_kind() {
            node_payload.2[kind as usize] += bytes;
        }
        // Dropping the last handle stops the swarm and frees its address.
        drop(running.handle);
    }

    async fn fire(&mut self, round: u32, scenario: &Scenario) -> Result<(), SimError> {
        for event in scenario.events_at(round).cloned().collect::<Vec<_>>() {
            let nodes: Vec<u64> = event.nodes.iter().map(|n| u64::from(*n)).collect();
            let groups = if event.groups.is_empty() { String::new() } else { format!(" {:?}", event.groups) };
            self.say(&format!("  round {round}: {:?} {:?}{groups}", event.action, event.nodes));
            match event.action {
                Action::Leave => {
                    for node in nodes {
                        self.stop(node, true).await;
                    }
                }
                Action::Crash => {
                    for node in nodes {
                        self.stop(node, false).await;
                    }
                }
                Action::Join | Action::Restart => {
                    for node in nodes {
                        if !self.running.contains_key(&node) {
                            self.start(node, true)?;
                        }
                    }
                }
                Action::Partition => {
                    let groups: Vec<Vec<u64>> = event.groups.iter().map(|g| g.iter().map(|n| u64::from(*n)).collect()).collect();
                    self.network.partition(&groups);
                }
                Action::Heal => {
                    self.network.heal();
                    self.redial().await;
                }
            }
        }
        Ok(())
    }

    /// After a heal, every node dials a few others again.
    async fn redial(&mut self) {
        let live: Vec<u64> = self.running.keys().copied().collect();
        for (node, running) in &self.running {
            for _ in 0..BOOTSTRAP_PEERS {
                let other = live[self.rng.below(live.len() as u64) as usize];
                if other != *node {
                    let addr: Multiaddr = SimNetwork::address(other);
                    let _ = running.handle.dial(addr).await;
                }
            }
        }
    }
}

/// Runs the whole simulation the configuration and options describe.
pub async fn simulate(config: &Config, args: &Options, quant: QuantMode) -> Result<(), SimError> {
    let scenario = match &args.scenario {
        Some(path) => Scenario::load(path).map_err(|e| SimError::Input(e.to_string()))?,
        None => Scenario::ideal(),
    };
    let (nodes, rounds) = (config.federation.nodes, config.federation.rounds);
    scenario.check(nodes, rounds).map_err(|e| SimError::Input(format!("{e} (--nodes {nodes}, --rounds {rounds})")))?;
    if args.attack.is_some() && args.attackers >= nodes {
        return Err(SimError::Input(format!("--attackers {} must be below --nodes {nodes}: someone has to be honest", args.attackers)));
    }
    let local_steps = u64::from(config.train.local_steps);
    let total_steps = u64::from(rounds) * local_steps;
    println!("loading {} on the compute thread ...", config.model.source);
    let compute_settings = ComputeSettings {
        local_steps,
        eval_rows: args.eval_rows,
        exact_match_rows: args.exact_match_rows,
    };
    let prepared = compute::spawn_for_config(config, quant, compute_settings, total_steps).map_err(SimError::Input)?;
    match &prepared.warm_up {
        Ok(took) => println!("warmed up in {:.1} s (the training step, evaluation and decoding built before round 0)", took.as_secs_f64()),
        Err(e) => println!("the warm-up failed ({e}); round 0 builds what it needs"),
    }
    let result = run_simulation(config, args, &scenario, &prepared).await;
    // MLX must let go of everything before the process exits.
    tokio::task::block_in_place(|| prepared.client.shutdown());
    result
}

async fn run_simulation(config: &Config, args: &Options, scenario: &Scenario, prepared: &compute::Prepared) -> Result<(), SimError> {
    let (nodes, rounds) = (config.federation.nodes, config.federation.rounds);
    let local_steps = u64::from(config.train.local_steps);
    let total_steps = u64::from(rounds) * local_steps;
    let compute = prepared.client.clone();
    let run_id = crate::node::run_id(&prepared.model_identity, &prepared.fingerprint, config);
    // Each simulation starts from empty stores, once its model and data
    // loaded (a run refused for bad input leaves the last one's folder).
    let work_dir = config.network.data_dir.join("simulate");
    let _ = std::fs::remove_dir_all(&work_dir);
    std::fs::create_dir_all(&work_dir).map_err(|e| SimError::Input(format!("{}: {e}", work_dir.display())))?;
    // The terminal shows the round table; the nodes' logs go to a file.
    let node_log = work_dir.join("nodes.log");
    if crate::logging::to_file_unless_verbose(&node_log).map_err(|e| SimError::Input(format!("{}: {e}", node_log.display())))? {
        println!("node logs: {} (-v shows them here)", node_log.display());
    }
    let metrics_path = args.metrics.clone().unwrap_or_else(|| work_dir.join("metrics.jsonl"));
    if let Some(parent) = metrics_path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| SimError::Input(format!("{}: {e}", parent.display())))?;
    }
    let mut metrics = std::fs::File::create(&metrics_path).map_err(|e| SimError::Input(format!("{}: {e}", metrics_path.display())))?;
    let builtin = config.data.dataset == "builtin" && args.exact_match_rows > 0;
    let timeout = scenario.round_timeout_secs.map(Duration::from_secs_f64).unwrap_or_else(|| {
        let per_node = SIM_TIMEOUT_PER_NODE.mul_f64((f64::from(nodes) / f64::from(SIM_LINEAR_NODES)).max(1.0));
        DEFAULT_SIM_TIMEOUT.max(per_node * nodes).min(Duration::from_secs(config.federation.round_timeout_secs))
    });
    let late: Vec<u64> = scenario.late_joiners().into_iter().map(u64::from).collect();
    let settings = EngineSettings {
        run_id,
        rounds: u64::from(rounds),
        method: crate::node::method(config),
        outer: crate::node::outer(config),
        compression: crate::node::compression(config),
        partition: PartitionMode::Hash {
            buckets: config.federation.num_buckets,
        },
        fingerprint: prepared.fingerprint.clone(),
        train_rows: Arc::new(prepared.train_rows.clone()),
        clock: RoundClock::ComputeIdle {
            timeout,
            busy: compute.busy(),
        },
        catch_up: false,
        // Round 0 waits for every node that starts with the run.
        // Every node that starts announces itself, but a silent attacker
        // never does: round 0 would wait for it for ever.
        min_members: (nodes as usize).saturating_sub(late.len()).saturating_sub(if args.attack == Some(Attack::Silent) { args.attackers as usize } else { 0 }).max(1),
        grace: Duration::from_millis(300),
        evaluate: false,
        save_every: 0,
        save_dir: None,
        limits: Limits::default(),
        measure_drift: false,
        // Simulated nodes restart from their peers (catch-up), not from disk.
        checkpoint: None,
        examples_per_round: crate::node::examples_per_round(config),
        exchange: crate::node::exchange(config),
        replicas: config.federation.replicas as usize,
        audit: config.federation.audit,
        misbehaviour: None,
    };
    println!(
        "simulating {nodes} nodes, {rounds} rounds of {local_steps} steps, scenario `{}`, `{}` averaging; run {}",
        scenario.name,
        serde_json::to_value(config.federation.aggregation).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default(),
        run_id
    );
    let before = if builtin { Some(compute.exact_match(None).await.map_err(SimError::Run)?) } else { None };
    if let Some(before) = before {
        println!("exact match before training: {:.1}% of {} test rows", before * 100.0, args.exact_match_rows);
    }
    let dashboard = Dashboard::launch(args.dashboard, "simulation", run_id.to_hex(), u64::from(rounds)).await.map_err(SimError::Input)?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut sim = Simulation {
        network: SimNetwork::new(scenario.link_params(), scenario.seed),
        run_id,
        settings,
        compute: compute.clone(),
        work_dir: work_dir.clone(),
        reports: tx,
        running: BTreeMap::new(),
        rng: SeededRng::new(scenario.seed ^ 0x5EED),
        seed: scenario.seed,
        traffic_seen: HashMap::new(),
        payload_by_node: BTreeMap::new(),
        store_quota: config.network.store_quota_mb.saturating_mul(1 << 20),
        attack: args.attack,
        first_attacker: u64::from(nodes.saturating_sub(args.attackers)),
        progress: ProgressBar::new(u64::from(nodes))
            .with_style(ProgressStyle::with_template("{msg}: {pos}/{len} nodes done [{elapsed}]").unwrap_or_else(|_| ProgressStyle::default_bar())),
    };
    if let Some(attack) = args.attack {
        println!("nodes {}..{} attack: {attack:?}; the table shows the honest nodes", u64::from(nodes.saturating_sub(args.attackers)), nodes - 1);
    }
    for node in (0..u64::from(nodes)).filter(|n| !late.contains(n)) {
        sim.start(node, false)?;
    }
    sim.fire(0, scenario).await?;
    println!(
        "{:>5} {:>5} {:>10} {:>9} {:>7} {:>9} {:>11} {:>11} {:>8}",
        "round", "nodes", "train loss", "eval loss", "exact", "agreement", "sent/node", "recv/node", "time"
    );
    let started = Instant::now();
    let mut fired_through = 0u32;
    let mut by_round: BTreeMap<u64, Vec<NodeRound>> = BTreeMap::new();
    let mut last_round: HashMap<u64, u64> = HashMap::new();
    let mut finished: Vec<u64> = Vec::new();
    let mut rows: Vec<RoundRow> = Vec::new();
    let mut rejected: BTreeMap<String, u64> = BTreeMap::new();
    // Nodes whose own average of each round was certified.
    let mut certified: BTreeMap<u64, u64> = BTreeMap::new();
    // Who quarantined whom (node numbers), and the first reason given.
    let node_of: HashMap<libp2p::PeerId, u64> = (0..u64::from(nodes)).map(|n| Ok((keypair(scenario.seed, n)?.public().to_peer_id(), n))).collect::<Result<_, SimError>>()?;
    let mut quarantined: BTreeMap<u64, (BTreeSet<u64>, String)> = BTreeMap::new();
    let mut node_rows: BTreeMap<u64, PeerRow> = BTreeMap::new();
    // Bounded: every node finishes, stops or fails; each event is one step.
    // The run is over when the honest nodes are done (an attacker cut off
    // by quarantine would only sit out its deadlines).
    let honest = |node: &u64| args.attack.is_none() || *node < u64::from(nodes.saturating_sub(args.attackers));
    while sim.running.keys().any(|n| honest(n) && !finished.contains(n)) {
        let Some((node, event, now)) = rx.recv().await else { break };
        match event {
            EngineEvent::Round(report) => {
                let peer = sim.running.get(&node).map(|r| r.handle.peer_id.to_string()).unwrap_or_default();
                node_rows.insert(node, PeerRow {
                    peer: format!("node {node}: {peer}"),
                    round: Some(report.round),
                    rows: Some(report.rows),
                    state: String::new(),
                    // In-memory links: every path is direct.
                    path: None,
                });
                let seen = sim.traffic_seen.insert(node, now).unwrap_or_default();
                let round = report.round;
                last_round.insert(node, round);
                // The table is the honest nodes' view: an attacker's own
                // average (a quarantined one's, say) is not the run's.
                let attacker = sim.attack.is_some() && node >= sim.first_attacker;
                if attacker {
                    continue;
                }
                if rows.last().is_some_and(|row| row.round >= round) {
                    // A node that rejoined from an older average redid a
                    // round the table already closed.
                    sim.say(&format!("  node {node} finished round {round} late (it rejoined from an older average)"));
                    continue;
                }
                by_round.entry(round).or_default().push(NodeRound {
                    node,
                    report,
                    traffic: Traffic {
                        sent: now.sent - seen.sent,
                        received: now.received - seen.received,
                    },
                });
                // Events of round r fire when the first node starts it.
                while fired_through < (round as u32 + 1).min(rounds.saturating_sub(1)) {
                    fired_through += 1;
                    sim.fire(fired_through, scenario).await?;
                }
            }
            EngineEvent::CaughtUp { round, from } => sim.say(&format!("  node {node} caught up: trains from round {round} on average {from}")),
            EngineEvent::Rejected { peer, reason } => {
                let kind = rejection_kind(&reason);
                *rejected.entry(kind.to_owned()).or_default() += 1;
                // Late updates of honest nodes are routine under churn.
                if kind == "stale-round" {
                    tracing::debug!(node, %peer, %reason, "rejected");
                } else {
                    tracing::warn!(node, %peer, %reason, kind, "rejected");
                }
            }
            EngineEvent::Certified { round, .. } => *certified.entry(round).or_default() += 1,
            EngineEvent::Quarantined { peer, reason } => {
                let accused = node_of.get(&peer).map_or_else(|| peer.to_string(), ToString::to_string);
                sim.say(&format!("  node {node} quarantined node {accused}: {reason}"));
                if let Some(accused) = node_of.get(&peer) {
                    quarantined.entry(*accused).or_insert_with(|| (BTreeSet::new(), reason)).0.insert(node);
                }
            }
            EngineEvent::Finished => finished.push(node),
            EngineEvent::Listening(_)
            | EngineEvent::PeerConnected(_)
            | EngineEvent::Resumed { .. }
            | EngineEvent::Collecting { .. }
            | EngineEvent::Waiting { .. }
            | EngineEvent::Members { .. } => {}
        }
        update_if(&dashboard, |view| {
            view.round = last_round.values().max().map_or(0, |r| r + 1);
            view.peers = node_rows
                .iter()
                .map(|(n, row)| PeerRow {
                    state: if finished.contains(n) { "finished" } else if sim.running.contains_key(n) { "running" } else { "offline" }.into(),
                    ..row.clone()
                })
                .collect();
            view.rejected_by_reason = rejected.clone();
        });
        // A round is complete once every running node has moved past it.
        while let Some(&round) = by_round.keys().next() {
            let running: Vec<&u64> = sim.running.keys().filter(|n| honest(n)).collect();
            let done = running.iter().filter(|n| finished.contains(n) || last_round.get(n).is_some_and(|r| *r >= round)).count();
            if done < running.len() {
                sim.show_progress(round, done, running.len());
                break;
            }
            let Some((round, nodes_round)) = by_round.pop_first() else { break };
            let row = close_round(round, &nodes_round, &compute, builtin, &mut metrics, &work_dir).await?;
            sim.progress.suspend(|| print_row(&row));
            rows.push(row);
            update_if(&dashboard, |view| show_row(view, &rows));
        }
    }
    sim.progress.finish_and_clear();
    while let Some((round, nodes_round)) = by_round.pop_first() {
        let row = close_round(round, &nodes_round, &compute, builtin, &mut metrics, &work_dir).await?;
        print_row(&row);
        rows.push(row);
    }
    let wall = started.elapsed();
    for node in sim.running.keys().copied().collect::<Vec<_>>() {
        sim.stop(node, true).await;
    }
    let last = rows.last().ok_or_else(|| SimError::Run("no round completed".into()))?;
    println!("done in {:.1} s; {} messages rejected{}", wall.as_secs_f64(), rejected.values().sum::<u64>(), rejection_detail(&rejected));
    println!("final agreement {:.2}, eval loss {:.4} (round 0: {:.4})", last.agreement, last.eval_loss, rows[0].eval_loss);
    // The model and the compute thread are shared: a node's own share is
    // its swarm, store, links and adapters.
    let peak_mb = table::memory_mb().1;
    if let Some(peak) = peak_mb {
        println!("memory: peak {peak:.0} MB in one process, {:.1} MB per simulated node", peak / f64::from(nodes.max(1)));
    }
    for (accused, (by, reason)) in &quarantined {
        println!("quarantined: node {accused} by {} nodes ({})", by.len(), rejection_kind(reason));
    }
    println!(
        "certified averages (nodes, by round): {}",
        certified.iter().map(|(round, nodes)| format!("{round}: {nodes}")).collect::<Vec<_>>().join(", ")
    );
    if let (Some(before), Some(after)) = (before, last.exact_match) {
        println!("exact match: {:.1}% before, {:.1}% after", before * 100.0, after * 100.0);
    }
    let adapter_bytes = crate::node::adapter_size(&last.modal.1).map_err(SimError::Run)?;
    let mean_traffic = rows.iter().map(|r| r.sent + r.received).sum::<f64>() / rows.len() as f64;
    let link_received = rows.iter().map(|r| r.received).sum::<f64>() / rows.len() as f64;
    let node_rounds = (f64::from(nodes) * rows.len() as f64).max(1.0);
    let received_of = |kind: PayloadKind| sim.payload_by_node.values().map(|(_, _, by_kind)| by_kind[kind as usize]).sum::<u64>();
    let payload: Vec<(PayloadKind, f64)> = PayloadKind::ALL.iter().map(|kind| (*kind, received_of(*kind) as f64 / node_rounds)).collect();
    // The run in one record (what `bench traffic` reads): bytes per node
    // per round, the busiest node's and the mean, over the rounds.
    let summary = json!({
        "summary": true,
        "nodes": nodes,
        "rounds": rows.len(),
        "adapter_bytes": adapter_bytes,
        "largest_node_bytes_per_round": rows.iter().map(|r| r.largest).sum::<f64>() / rows.len() as f64,
        "mean_node_bytes_per_round": mean_traffic,
        "agreement": last.agreement,
        "eval_loss": last.eval_loss,
        "wall_seconds": wall.as_secs_f64(),
        "peak_rss_mb": peak_mb,
        "peak_rss_mb_per_node": peak_mb.map(|peak| peak / f64::from(nodes.max(1))),
        "certified_nodes_by_round": certified.values().collect::<Vec<_>>(),
        "link_received_per_node_round": link_received,
        "payload_received_per_node_round": payload.iter().map(|(kind, bytes)| (kind.name().to_owned(), json!(bytes))).collect::<serde_json::Map<_, _>>(),
        // Over the whole run, by node (a restarted node's lives added up).
        "payload_by_node": sim.payload_by_node.iter().map(|(node, (sent, received, by_kind))| {
            let kinds: serde_json::Map<_, _> = PayloadKind::ALL.iter().map(|kind| (kind.name().to_owned(), json!(by_kind[*kind as usize]))).collect();
            (node.to_string(), json!({"sent": sent, "received": received, "received_by_kind": kinds}))
        }).collect::<serde_json::Map<_, _>>(),
        "quarantined": quarantined.iter().map(|(accused, (by, reason))| json!({"node": accused, "by": by.len(), "kind": rejection_kind(reason)})).collect::<Vec<_>>(),
    });
    writeln!(metrics, "{summary}").map_err(|e| SimError::Run(format!("{}: {e}", metrics_path.display())))?;
    println!(
        "traffic per node per round: {} sent+received; a Flower server would move {} per client (adapter {} up, average down)",
        megabytes(mean_traffic),
        megabytes(2.0 * adapter_bytes as f64),
        megabytes(adapter_bytes as f64)
    );
    println!("{}", table::payload_breakdown(link_received, &payload));
    let adapter_dir = work_dir.join("adapter");
    compute.save((*last.modal.1).clone(), adapter_dir.clone()).await.map_err(SimError::Run)?;
    println!("averaged adapter {} saved in mlx-lm format to {}", last.modal.0, adapter_dir.display());
    if args.centralized_baseline {
        // Two readings of "the same total steps": as many steps as the run's
        // schedule (each node's count), and as many as all nodes together.
        for (what, steps) in [("the run's steps", total_steps), ("all nodes' steps", total_steps * u64::from(nodes))] {
            println!("centralized baseline: {steps} steps ({what}) on all rows ...");
            let central = compute.centralized(steps).await.map_err(SimError::Run)?;
            let loss = compute.evaluate(central).await.map_err(SimError::Run)?;
            let gap = (last.eval_loss - f64::from(loss)) / f64::from(loss) * 100.0;
            println!("centralized eval loss {loss:.4} after {steps} steps; federated {:.4}; gap {gap:+.1}%", last.eval_loss);
            let record = json!({"centralized_eval_loss": loss, "centralized_steps": steps, "federated_eval_loss": last.eval_loss, "gap_percent": gap});
            writeln!(metrics, "{record}").map_err(|e| SimError::Run(format!("{}: {e}", metrics_path.display())))?;
        }
    }
    let plot_path = metrics_path.with_extension("svg");
    let round_axis: Vec<f64> = rows.iter().map(|r| r.round as f64).collect();
    let series = [
        Series::new("train loss", &round_axis, rows.iter().map(|r| r.train_loss)),
        Series::new("eval loss", &round_axis, rows.iter().map(|r| r.eval_loss)),
    ];
    let mut lower = vec![Series::new("agreement", &round_axis, rows.iter().map(|r| r.agreement))];
    if builtin {
        lower.push(Series::new("exact match", &round_axis, rows.iter().map(|r| r.exact_match.unwrap_or(0.0))));
    }
    plot_rounds(&plot_path, &format!("{} nodes, scenario {}", nodes, scenario.name), &series, &lower).map_err(SimError::Run)?;
    println!("metrics: {}; plot: {}", metrics_path.display(), plot_path.display());
    if let Some(dashboard) = &dashboard {
        dashboard.update(|view| {
            show_row(view, &rows);
            view.finished = true;
        });
        println!("the dashboard stays up until Ctrl-C");
        let _ = tokio::signal::ctrl_c().await;
    }
    Ok(())
}

