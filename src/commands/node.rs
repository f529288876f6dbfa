//! `blossom-p2p start` and `relay`: run a libp2p node until Ctrl-C.
//!
//! `start` trains (the round engine, `commands::start`) unless it is given
//! `--publish` or `--receive-dir`: then it only exchanges adapter files,
//! joining the run's topics, taking part in gossip, serving chunks,
//! publishing a file and keeping what it receives. `relay` is the same swarm
//! with a circuit-relay server and Kademlia in server mode, training nothing.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use libp2p_identity::Keypair;

use crate::config::Config;
use crate::p2p::network::{Exchange, NetworkEvent, NetworkHandle, spawn};
use crate::wire::codec::{Digest, Limits, decode_adapter, encode_adapter};
use crate::wire::manifest::{Manifest, SignedManifest};

use super::node_args::{NodeError, RelayArgs, StartArgs, load_or_create_identity, network_options, next_or_ctrl_c, run_id, with_peer_id};

/// How often a seeding relay asks its runs' nodes for their certified averages.
const SEED_REFRESH: Duration = Duration::from_secs(15);
/// How often a relay logs the bytes it carried for each peer (those that
/// changed, and those gone since).
const CARRIED_REPORT: Duration = Duration::from_secs(30);

fn exit(err: NodeError) -> ExitCode {
    eprintln!("error: {err}");
    match err {
        NodeError::Input(_) => ExitCode::from(2),
        NodeError::Run(_) => ExitCode::FAILURE,
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, NodeError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| NodeError::Run(format!("cannot start the async runtime: {e}")))
}

pub fn start(config: &Config, args: &StartArgs) -> ExitCode {
    let exchange_only = args.publish.is_some() || args.receive_dir.is_some();
    let result = runtime().and_then(|rt| {
        if exchange_only {
            rt.block_on(run_exchange(config, args))
        } else {
            rt.block_on(train(config, args))
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => exit(err),
    }
}

#[cfg(feature = "train")]
async fn train(config: &Config, args: &StartArgs) -> Result<(), NodeError> {
    super::start::run(config, args).await
}

/// A relay build has no trainer: `start` only exchanges adapter files.
#[cfg(not(feature = "train"))]
async fn train(_config: &Config, _args: &StartArgs) -> Result<(), NodeError> {
    Err(NodeError::Input(
        "this binary was built without the `train` feature (a relay build): `start` can only exchange adapters \
         (--publish FILE or --receive-dir DIR); build with default features to train"
            .to_owned(),
    ))
}

pub fn relay(config: &Config, args: &RelayArgs) -> ExitCode {
    match runtime().and_then(|rt| rt.block_on(run_relay(config, args))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => exit(err),
    }
}

/// A signed manifest and the canonical bytes of an adapter file.
fn prepare_publication(path: &Path, run_id: Digest, keypair: &Keypair) -> Result<(SignedManifest, Manifest, Vec<u8>), NodeError> {
    let raw = std::fs::read(path).map_err(|e| NodeError::Input(format!("{}: {e}", path.display())))?;
    let tensors = decode_adapter(&raw, &Limits::default()).map_err(|e| NodeError::Input(format!("{}: {e}", path.display())))?;
    let bytes = encode_adapter(&tensors).map_err(|e| NodeError::Input(format!("{}: {e}", path.display())))?;
    let manifest = Manifest::describe(run_id, 0, &keypair.public().to_peer_id(), &bytes);
    let signed = SignedManifest::sign(&manifest, keypair).map_err(|e| NodeError::Run(e.to_string()))?;
    Ok((signed, manifest, bytes))
}

/// Publishing needs peers in the gossip mesh: retry for up to two minutes.
async fn publish_when_meshed(handle: NetworkHandle, signed: SignedManifest, manifest: Manifest, bytes: Vec<u8>) {
    for _ in 0..240 {
        match handle.publish(signed.clone(), manifest.clone(), bytes.clone()).await {
            Ok(()) => {
                println!("published adapter {} ({} bytes, {} chunks)", manifest.adapter_hash, bytes.len(), manifest.chunk_ids.len());
                return;
            }
            Err(e) => tracing::debug!(error = %e, "not published yet"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tracing::error!("gave up publishing after two minutes: no peer joined the run's topics");
}

fn save_adapter(dir: &Path, hash: &Digest, bytes: &[u8]) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = dir.join(format!("{hash}.safetensors"));
    let temp = dir.join(format!(".{hash}.tmp"));
    std::fs::write(&temp, bytes).map_err(|e| format!("{}: {e}", temp.display()))?;
    std::fs::rename(&temp, &path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// Exchange mode: publish and/or receive adapter files, train nothing.
async fn run_exchange(config: &Config, args: &StartArgs) -> Result<(), NodeError> {
    let keypair = load_or_create_identity(&config.network.data_dir).map_err(NodeError::Input)?;
    let run_id = run_id(config, args.run_id.as_deref())?;
    let publication = match &args.publish {
        Some(path) => Some(prepare_publication(path, run_id, &keypair)?),
        None => None,
    };
    let options = network_options(config, &args.network, &config.network.bootstrap, false)?;
    let (handle, mut events) = spawn(keypair, options).map_err(|e| NodeError::Run(e.to_string()))?;
    handle.subscribe(run_id, Exchange::Gossip).await.map_err(|e| NodeError::Run(e.to_string()))?;
    println!("peer id: {}", handle.peer_id);
    println!("run id: {run_id}");
    if let Some((signed, manifest, bytes)) = publication {
        tokio::spawn(publish_when_meshed(handle.clone(), signed, manifest, bytes));
    }
    // Until an adapter arrives, every new peer is asked for the newest one.
    let mut caught_up = !args.catch_up;
    loop {
        let Some(event) = next_or_ctrl_c(events.recv()).await? else { return Ok(()) };
        match event {
            NetworkEvent::Listening(addr) => println!("listening on {}", with_peer_id(addr, &handle)),
            NetworkEvent::PeerConnected(peer) => {
                tracing::info!(%peer, "connected");
                if !caught_up {
                    let handle = handle.clone();
                    tokio::spawn(async move {
                        // Let the peer's identify and subscriptions settle first.
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        if let Err(e) = handle.catch_up(run_id).await {
                            tracing::warn!(error = %e, "catch-up failed");
                        }
                    });
                }
            }
            NetworkEvent::Manifest { manifest, author } => {
                tracing::info!(%author, round = manifest.round, adapter = %manifest.adapter_hash, "manifest")
            }
            NetworkEvent::AdapterReady { manifest, author, bytes } => {
                caught_up = true;
                println!("received adapter {} from {author} ({} bytes, hash verified)", manifest.adapter_hash, bytes.len());
                if let Some(dir) = &args.receive_dir {
                    match save_adapter(dir, &manifest.adapter_hash, &bytes) {
                        Ok(path) => println!("saved {}", path.display()),
                        Err(e) => tracing::error!(error = %e, "cannot save the adapter"),
                    }
                }
            }
            NetworkEvent::Certified(news) => println!(
                "certificate for round {}: average {}, {} of {} contributors signed",
                news.round, news.average, news.signers, news.contributors
            ),
            NetworkEvent::Rejected { peer, reason } => tracing::warn!(%peer, %reason, "rejected"),
            NetworkEvent::Quarantined { peer, reason } => println!("quarantined {peer}: {reason}"),
            NetworkEvent::DialFailed { peer, error } => tracing::warn!(?peer, %error, "could not connect"),
        }
    }
}

/// Logs each peer's bytes through this relay (its connection to the peer
/// carries that peer's circuits), totals since it connected.
fn report_carried(handle: &NetworkHandle) {
    for traffic in handle.peer_bytes() {
        let (peer, from_peer, to_peer) = (traffic.peer, traffic.received, traffic.sent);
        let megabytes = from_peer.saturating_add(to_peer) as f64 / 1e6;
        if traffic.gone {
            tracing::info!(%peer, from_peer, to_peer, "bytes carried for {peer}: {megabytes:.2} MB in all; it has disconnected");
        } else {
            tracing::info!(%peer, from_peer, to_peer, "bytes carried for {peer}: {megabytes:.2} MB so far");
        }
    }
}

async fn run_relay(config: &Config, args: &RelayArgs) -> Result<(), NodeError> {
    let seed_runs = args
        .seed_runs
        .iter()
        .map(|hex| Digest::from_hex(hex).ok_or_else(|| NodeError::Input(format!("--seed-run `{hex}` must be 64 hex digits"))))
        .collect::<Result<Vec<_>, _>>()?;
    let keypair = load_or_create_identity(&config.network.data_dir).map_err(NodeError::Input)?;
    let options = network_options(config, &args.network, &config.network.bootstrap, true)?;
    let (handle, mut events) = spawn(keypair, options).map_err(|e| NodeError::Run(e.to_string()))?;
    println!("relay peer id: {}", handle.peer_id);
    // A seeding relay joins the runs' topics like any node: it validates and
    // keeps what it sees, asks the runs' nodes for their certified averages
    // (checking every signature), and answers late joiners' catch-up
    // requests with the best of them even while every trainer is offline.
    for run_id in &seed_runs {
        handle.subscribe(*run_id, Exchange::Gossip).await.map_err(|e| NodeError::Run(e.to_string()))?;
        println!("seeding run {run_id}");
    }
    let mut ask = tokio::time::interval(SEED_REFRESH);
    let mut carried = tokio::time::interval(CARRIED_REPORT);
    loop {
        let event = tokio::select! {
            event = next_or_ctrl_c(events.recv()) => event?,
            _ = carried.tick() => {
                report_carried(&handle);
                continue;
            }
            _ = ask.tick() => {
                for run_id in &seed_runs {
                    // No peer yet is routine: the next tick asks again.
                    let _ = handle.catch_up(*run_id).await;
                }
                continue;
            }
        };
        let Some(event) = event else { return Ok(()) };
        match event {
            NetworkEvent::Listening(addr) => println!("listening on {}", with_peer_id(addr, &handle)),
            NetworkEvent::PeerConnected(peer) => tracing::info!(%peer, "connected"),
            NetworkEvent::Certified(news) => tracing::info!(round = news.round, average = %news.average, signers = news.signers, contributors = news.contributors, "certificate offered"),
            NetworkEvent::AdapterReady { manifest, .. } => println!("seeding adapter {} (round {})", manifest.adapter_hash, manifest.round),
            other => tracing::debug!(?other, "event"),
        }
    }
}
