//! `blossom-p2p start` and `relay`: run a libp2p node until Ctrl-C.
//!
//! `start` trains (the round engine, `commands::start`) unless it is given
//! `--publish` or `--receive-dir`: then it only exchanges adapter files,
//! joining the run's topics, taking part in gossip, serving chunks,
//! publishing a file and keeping what it receives. `relay` is the same swarm
//! with a circuit-relay server and Kademlia in server mode, training nothing.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use libp2p::pnet::PreSharedKey;
use libp2p::{Multiaddr, PeerId};
use libp2p_identity::Keypair;

use crate::config::{Config, ConfigError, Origin, Partitioning};
use crate::p2p::network::{Exchange, NetworkEvent, NetworkHandle, NetworkOptions, TransportKind, spawn};
use crate::wire::codec::{Digest, Limits, decode_adapter, encode_adapter};
use crate::wire::manifest::{Manifest, SignedManifest};

#[cfg(feature = "train")]
use super::args::{DataArgs, ModelArgs, QuantArgs};

#[derive(Debug, Args)]
pub struct NetworkArgs {
    /// Multiaddr to listen on (repeatable); replaces network.listen.
    #[arg(long, value_name = "MULTIADDR")]
    pub listen: Vec<String>,
    /// Directory for the identity key, chunk store and checkpoints.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Pre-shared key file of a private network.
    #[arg(long, value_name = "FILE")]
    pub psk: Option<PathBuf>,
    /// Only these peer ids (one per line, `#` comments) may connect; others
    /// are refused and their manifests ignored.
    #[arg(long, value_name = "FILE")]
    pub allow_peers: Option<PathBuf>,
    /// An address others can reach this node at (repeatable), e.g. a public IP or port forward.
    #[arg(long, value_name = "MULTIADDR")]
    pub external_address: Vec<String>,
}

#[derive(Debug, Args)]
pub struct StartArgs {
    /// Multiaddr of a peer or relay to join through (repeatable).
    #[arg(long, value_name = "MULTIADDR")]
    pub bootstrap: Vec<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (a loopback address,
    /// e.g. 127.0.0.1:9090; port 0 picks one).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Serve the live web dashboard at http://ADDR/ (a loopback address, e.g. 127.0.0.1:8090).
    #[arg(long, value_name = "ADDR")]
    pub dashboard: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub network: NetworkArgs,
    #[cfg(feature = "train")]
    #[command(flatten)]
    pub model: ModelArgs,
    #[cfg(feature = "train")]
    #[command(flatten)]
    pub quant: QuantArgs,
    #[cfg(feature = "train")]
    #[command(flatten)]
    pub data: DataArgs,
    /// Do not look for peers on the LAN by mDNS.
    #[arg(long)]
    pub no_mdns: bool,
    /// Static partitioning: train on partition K of --num-partitions (as the old IID partitioner).
    #[arg(long, value_name = "K", requires = "num_partitions")]
    pub partition_id: Option<u32>,
    /// Static partitioning: the number of partitions.
    #[arg(long, value_name = "N", requires = "partition_id", value_parser = clap::value_parser!(u32).range(1..))]
    pub num_partitions: Option<u32>,
    /// The run to join, as 64 hex digits (default: derived from the configuration).
    #[arg(long, value_name = "HEX")]
    pub run_id: Option<String>,
    /// Publish this adapter (safetensors, e.g. adapters.safetensors) once peers are there.
    #[arg(long, value_name = "FILE")]
    pub publish: Option<PathBuf>,
    /// Write every adapter received and verified into this folder, as <hash>.safetensors.
    #[arg(long, value_name = "DIR")]
    pub receive_dir: Option<PathBuf>,
    /// Ask connected peers for the newest adapter of the run on start (late joiners).
    #[arg(long)]
    pub catch_up: bool,
}

#[derive(Debug, Args)]
pub struct RelayArgs {
    #[command(flatten)]
    pub network: NetworkArgs,
    /// Also keep and serve the newest adapters of these runs to late joiners
    /// (repeatable; 64 hex digits each, as `start` prints them).
    #[arg(long = "seed-run", value_name = "RUN_ID")]
    pub seed_runs: Vec<String>,
}

impl NetworkArgs {
    pub fn apply(&self, config: &mut Config) {
        if !self.listen.is_empty() {
            config.network.listen = self.listen.clone();
        }
        if let Some(dir) = &self.data_dir {
            config.network.data_dir = dir.clone();
        }
        if let Some(file) = &self.allow_peers {
            config.network.allow_peers_file = Some(file.clone());
        }
        if let Some(psk) = &self.psk {
            config.network.psk_file = Some(psk.clone());
        }
    }
}

impl StartArgs {
    /// Flags that contradict each other, found before anything loads.
    pub fn check(&self) -> Result<(), ConfigError> {
        if let (Some(id), Some(count)) = (self.partition_id, self.num_partitions)
            && id >= count
        {
            return Err(ConfigError::Invalid {
                origin: Origin::Flags("start".to_owned()),
                key: "--partition-id".to_owned(),
                message: format!("must be below --num-partitions ({count}), got {id}"),
            });
        }
        Ok(())
    }

    pub fn apply(&self, config: &mut Config) {
        self.network.apply(config);
        #[cfg(feature = "train")]
        {
            self.model.apply(config);
            self.data.apply(config);
        }
        if !self.bootstrap.is_empty() {
            config.network.bootstrap = self.bootstrap.clone();
        }
        if self.no_mdns {
            config.network.mdns = false;
        }
        if self.partition_id.is_some() {
            config.federation.partitioning = Partitioning::Static;
        }
    }
}

const IDENTITY_FILE: &str = "identity.key";
/// How often a seeding relay asks its runs' nodes for their certified averages.
const SEED_REFRESH: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub(crate) enum NodeError {
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Run(String),
}

fn exit(err: NodeError) -> ExitCode {
    eprintln!("error: {err}");
    match err {
        NodeError::Input(_) => ExitCode::from(2),
        NodeError::Run(_) => ExitCode::FAILURE,
    }
}

/// The node's ed25519 identity, created on first start (mode 0600).
pub fn load_or_create_identity(data_dir: &Path) -> Result<Keypair, String> {
    let path = data_dir.join(IDENTITY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes)
            .map_err(|e| format!("identity file {} is not a libp2p key ({e}); move it away to create a new identity", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(data_dir)
                .map_err(|e| format!("cannot create the data directory {} ({e}); choose a writable --data-dir", data_dir.display()))?;
            let keypair = Keypair::generate_ed25519();
            let bytes = keypair.to_protobuf_encoding().map_err(|e| e.to_string())?;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            std::io::Write::write_all(&mut file, &bytes).map_err(|e| format!("{}: {e}", path.display()))?;
            tracing::info!(path = %path.display(), "created a new node identity");
            Ok(keypair)
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

fn multiaddrs(values: &[String], what: &str) -> Result<Vec<Multiaddr>, NodeError> {
    values
        .iter()
        .map(|v| v.parse().map_err(|e| NodeError::Input(format!("{what} `{v}` is not a multiaddr ({e}), e.g. /ip4/1.2.3.4/tcp/4001"))))
        .collect()
}

/// The run id of exchange mode: given, or blake3 of the run-defining parts
/// of the configuration (a training node adds the model's and the data's
/// hashes: `crate::node::run_id`).
pub(crate) fn run_id(config: &Config, given: Option<&str>) -> Result<Digest, NodeError> {
    if let Some(hex) = given {
        return Digest::from_hex(hex).ok_or_else(|| NodeError::Input(format!("--run-id `{hex}` must be 64 hex digits")));
    }
    let canonical = serde_json::to_vec(&(&config.model, &config.lora, &config.train, &config.data, &config.federation))
        .map_err(|e| NodeError::Run(e.to_string()))?;
    Ok(Digest::of(&canonical))
}

pub(crate) fn network_options(config: &Config, network: &NetworkArgs, bootstrap: &[String], relay_server: bool) -> Result<NetworkOptions, NodeError> {
    let psk = match &config.network.psk_file {
        Some(path) => Some(read_psk(path)?),
        None => None,
    };
    if psk.is_some() && config.network.listen.iter().any(|a| a.contains("/quic")) {
        tracing::warn!("a pre-shared key is set: QUIC is off (pnet cannot wrap it); only the TCP listen addresses are used");
    }
    let listen: Vec<String> = config
        .network
        .listen
        .iter()
        .filter(|a| psk.is_none() || !a.contains("/quic"))
        .cloned()
        .collect();
    Ok(NetworkOptions {
        psk,
        mesh_n: None,
        slice_owners: config.federation.replicas as usize,
        transport: TransportKind::Internet,
        listen: multiaddrs(&listen, "listen address")?,
        bootstrap: multiaddrs(bootstrap, "bootstrap address")?,
        external: multiaddrs(&network.external_address, "external address")?,
        mdns: config.network.mdns,
        relay_server,
        store_dir: config.network.data_dir.join("store"),
        store_quota: config.network.store_quota_mb.saturating_mul(1 << 20),
        limits: Limits::default(),
        allowed_peers: match &config.network.allow_peers_file {
            Some(path) => Some(read_allowlist(path)?),
            None => None,
        },
    })
}

/// A closed run's peer ids: one per line; blank lines and `#` comments are
/// skipped.
pub(crate) fn read_allowlist(path: &Path) -> Result<HashSet<PeerId>, NodeError> {
    let text = std::fs::read_to_string(path).map_err(|e| NodeError::Input(format!("allowlist {}: {e}", path.display())))?;
    let mut peers = HashSet::new();
    for (number, line) in text.lines().enumerate() {
        let entry = line.split('#').next().unwrap_or_default().trim();
        if entry.is_empty() {
            continue;
        }
        let peer: PeerId = entry.parse().map_err(|e| {
            NodeError::Input(format!("allowlist {}:{}: `{entry}` is not a peer id ({e}); `blossom-p2p start` prints each node's", path.display(), number + 1))
        })?;
        peers.insert(peer);
    }
    if peers.is_empty() {
        return Err(NodeError::Input(format!("allowlist {} names no peer; list the run's peer ids, one per line", path.display())));
    }
    Ok(peers)
}

/// A libp2p swarm key file (`/key/swarm/psk/1.0.0/`, `/base16/`, 64 hex
/// digits), as go-ipfs and rust-libp2p write them.
fn read_psk(path: &Path) -> Result<PreSharedKey, NodeError> {
    let text = std::fs::read_to_string(path).map_err(|e| NodeError::Input(format!("pre-shared key {}: {e}", path.display())))?;
    text.parse().map_err(|e| {
        NodeError::Input(format!(
            "pre-shared key {}: {e}; expected the lines /key/swarm/psk/1.0.0/, /base16/ and 64 hex digits",
            path.display()
        ))
    })
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

/// `addr` ending in this node's `/p2p/<peer id>` (circuit addresses already do).
pub(crate) fn with_peer_id(addr: Multiaddr, handle: &NetworkHandle) -> Multiaddr {
    match addr.iter().last() {
        Some(libp2p::multiaddr::Protocol::P2p(peer)) if peer == handle.peer_id => addr,
        _ => addr.with(libp2p::multiaddr::Protocol::P2p(handle.peer_id)),
    }
}

/// The next item, or `None` on Ctrl-C.
pub(crate) async fn next_or_ctrl_c<T>(next: impl std::future::Future<Output = Option<T>>) -> Result<Option<T>, NodeError> {
    tokio::select! {
        item = next => item.map(Some).ok_or_else(|| NodeError::Run("the network task stopped".into())),
        _ = tokio::signal::ctrl_c() => {
            println!("stopping");
            Ok(None)
        }
    }
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
    loop {
        let event = tokio::select! {
            event = next_or_ctrl_c(events.recv()) => event?,
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
