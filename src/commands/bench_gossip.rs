//! `blossom-p2p bench gossip`: how long an adapter takes to reach every node
//! of an N-node network on loopback, and how many bytes cross the wire for
//! it, for several gossipsub mesh degrees, side by side in one run.
//!
//! Bytes are the loopback interface's transmitted bytes (Linux
//! `/proc/net/dev`) during the transfer, less the idle rate measured just
//! before: everything on the wire (IP/TCP headers, noise, yamux, gossip
//! control) for the whole network, which is what a user's uplinks pay.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use libp2p::Multiaddr;
use libp2p_identity::Keypair;
use tokio::sync::mpsc::Receiver;

use crate::p2p::network::{Exchange, NetworkEvent, NetworkHandle, NetworkOptions, TransportKind, spawn};
use crate::wire::codec::{Digest, Limits, TensorBytes, TensorDtype, encode_adapter};
use crate::wire::manifest::{Manifest, SignedManifest};

#[derive(Debug, Args)]
pub struct BenchGossipArgs {
    /// Nodes in the network.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(2..=128))]
    pub nodes: u32,
    /// Adapter size in megabytes.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub megabytes: u32,
    /// Gossipsub mesh degrees D to compare (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = vec![3, 6, 8], value_parser = clap::value_parser!(u32).range(1..=64))]
    pub mesh: Vec<u32>,
}

/// Bounded waits: the whole benchmark cannot hang.
const SETTLE: Duration = Duration::from_secs(4);
const DEADLINE: Duration = Duration::from_secs(180);

fn loopback_tx_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/dev").ok()?;
    let line = text.lines().find(|l| l.trim_start().starts_with("lo:"))?;
    // Interface: rx bytes packets errs drop fifo frame compressed multicast | tx bytes ...
    line.split(':').nth(1)?.split_whitespace().nth(8)?.parse().ok()
}

struct Node {
    handle: NetworkHandle,
    events: Receiver<NetworkEvent>,
    keypair: Keypair,
}

async fn start_network(nodes: usize, mesh_n: usize, store: &std::path::Path) -> Result<Vec<Node>, String> {
    let mut started: Vec<Node> = Vec::with_capacity(nodes);
    let mut addrs: Vec<Multiaddr> = Vec::with_capacity(nodes);
    for i in 0..nodes {
        // Each node dials two earlier ones: a connected graph with some redundancy.
        let bootstrap: Vec<Multiaddr> = [i.checked_sub(1), (i >= 3).then(|| (i * 7) % (i - 1))]
            .into_iter()
            .flatten()
            .filter_map(|j| addrs.get(j).cloned())
            .collect();
        let keypair = Keypair::generate_ed25519();
        let options = NetworkOptions {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().map_err(|e| format!("{e}"))?],
            bootstrap,
            external: vec![],
            mdns: false,
            relay_server: None,
            hole_punching: true,
            store_dir: store.join(format!("node{i}")),
            store_quota: 1 << 30,
            limits: Limits::default(),
            psk: None,
            mesh_n: Some(mesh_n),
            slice_owners: 2,
            transport: TransportKind::Internet,
            allowed_peers: None,
        };
        let (handle, mut events) = spawn(keypair.clone(), options).map_err(|e| e.to_string())?;
        let addr = tokio::time::timeout(DEADLINE, async {
            loop {
                if let Some(NetworkEvent::Listening(addr)) = events.recv().await {
                    return addr;
                }
            }
        })
        .await
        .map_err(|_| "a node did not start listening".to_owned())?;
        addrs.push(addr);
        started.push(Node { handle, events, keypair });
    }
    Ok(started)
}

struct Figures {
    mesh_n: usize,
    seconds: f64,
    wire_bytes: Option<u64>,
}

async fn one_run(args: &BenchGossipArgs, mesh_n: usize, store: PathBuf) -> Result<Figures, String> {
    let mut nodes = start_network(args.nodes as usize, mesh_n, &store).await?;
    let run_id = Digest::of(format!("bench gossip {mesh_n}").as_bytes());
    for node in &nodes {
        node.handle.subscribe(run_id, Exchange::Gossip).await.map_err(|e| e.to_string())?;
    }
    tokio::time::sleep(SETTLE).await;
    let count = args.megabytes as usize * 1024 * 1024 / 4;
    let bytes = encode_adapter(&[TensorBytes {
        name: "lora_a".into(),
        dtype: TensorDtype::F32,
        shape: vec![count],
        data: (0..count).flat_map(|i| ((i % 4093) as f32).to_le_bytes()).collect(),
    }])
    .map_err(|e| e.to_string())?;
    let author = &nodes[0].keypair;
    let manifest = Manifest::describe(run_id, 0, &author.public().to_peer_id(), &bytes);
    let signed = SignedManifest::sign(&manifest, author).map_err(|e| e.to_string())?;
    // The idle rate of the network (heartbeats, pings), to subtract.
    let idle_start = loopback_tx_bytes();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rate = match (idle_start, loopback_tx_bytes()) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64),
        _ => None,
    };
    let before = loopback_tx_bytes();
    let started = Instant::now();
    nodes[0].handle.publish(signed, manifest, bytes.clone()).await.map_err(|e| e.to_string())?;
    for node in nodes.iter_mut().skip(1) {
        let left = DEADLINE.checked_sub(started.elapsed()).unwrap_or_default();
        tokio::time::timeout(left, async {
            loop {
                match node.events.recv().await {
                    Some(NetworkEvent::AdapterReady { .. }) | None => return,
                    Some(_) => {}
                }
            }
        })
        .await
        .map_err(|_| format!("the adapter did not reach every node within {} s", DEADLINE.as_secs()))?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let wire_bytes = match (before, loopback_tx_bytes(), idle_rate) {
        (Some(a), Some(b), Some(idle)) => Some(b.saturating_sub(a).saturating_sub((idle * seconds) as u64)),
        _ => None,
    };
    Ok(Figures { mesh_n, seconds, wire_bytes })
}

pub fn bench_gossip(args: &BenchGossipArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Ok(store) = tempfile_dir() else {
        eprintln!("error: cannot create a temporary store");
        return ExitCode::FAILURE;
    };
    let payload = f64::from(args.megabytes) * 1024.0 * 1024.0;
    let receivers = f64::from(args.nodes - 1);
    println!(
        "bench gossip: {} nodes on loopback TCP, a {} MB adapter from one node; ideal wire bytes = payload x {} receivers",
        args.nodes,
        args.megabytes,
        args.nodes - 1
    );
    println!("{:>6} {:>12} {:>16} {:>18} {:>10}", "mesh D", "time (s)", "wire MB (all)", "MB sent / node", "x ideal");
    for &mesh_n in &args.mesh {
        let mesh_n = mesh_n as usize;
        match runtime.block_on(one_run(args, mesh_n, store.join(format!("d{mesh_n}")))) {
            Ok(f) => {
                let (total, per_node, ratio) = match f.wire_bytes {
                    Some(b) => (
                        format!("{:.1}", b as f64 / 1e6),
                        format!("{:.1}", b as f64 / 1e6 / f64::from(args.nodes)),
                        format!("{:.2}", b as f64 / (payload * receivers)),
                    ),
                    None => ("n/a".into(), "n/a".into(), "n/a".into()),
                };
                println!("{:>6} {:>12.2} {:>16} {:>18} {:>10}", f.mesh_n, f.seconds, total, per_node, ratio);
            }
            Err(e) => {
                eprintln!("error: mesh D = {mesh_n}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&store);
    ExitCode::SUCCESS
}

fn tempfile_dir() -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("blossom-bench-gossip-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
