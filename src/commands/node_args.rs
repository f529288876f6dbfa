//! What `start` and `relay` share: their flags, the node's identity, the
//! network options and run id they make from the configuration, and their
//! errors. `commands::node` (the exchange-only node and the relay) and
//! `commands::start` (the training node) both build on it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use libp2p::pnet::PreSharedKey;
use libp2p::{Multiaddr, PeerId};
use libp2p_identity::Keypair;

use crate::config::{Config, ConfigError, Origin, Partitioning, RelayConfig};
use crate::p2p::behaviour::RelayLimits;
use crate::p2p::network::{NetworkHandle, NetworkOptions, TransportKind};
use crate::wire::codec::{Digest, Limits};

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

#[derive(Debug, thiserror::Error)]
pub(crate) enum NodeError {
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Run(String),
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
        relay_server: relay_server.then(|| relay_limits(&config.relay)),
        hole_punching: config.network.hole_punching,
        store_dir: config.network.data_dir.join("store"),
        store_quota: config.network.store_quota_mb.saturating_mul(1 << 20),
        limits: Limits::default(),
        allowed_peers: match &config.network.allow_peers_file {
            Some(path) => Some(read_allowlist(path)?),
            None => None,
        },
    })
}

/// The relay's limits, from `[relay]`.
pub fn relay_limits(relay: &RelayConfig) -> RelayLimits {
    RelayLimits {
        max_circuit_bytes: relay.max_circuit_bytes,
        max_circuit_duration: Duration::from_secs(relay.max_circuit_duration_secs),
        max_reservations: relay.max_reservations as usize,
        max_reservations_per_peer: relay.max_reservations_per_peer as usize,
        max_circuits: relay.max_circuits as usize,
        max_circuits_per_peer: relay.max_circuits_per_peer as usize,
        per_peer_per_minute: relay.per_peer_per_minute,
        // Validated finite and not negative; 0 is no cap.
        max_peer_bytes_per_sec: Some((relay.max_peer_mbit_per_sec * 1e6 / 8.0) as u64).filter(|rate| *rate > 0),
    }
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
