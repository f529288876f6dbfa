//! Run configuration: TOML files in `configs/`, plus `--set section.key=value`
//! overrides from the command line.
//!
//! Every field has a default that matches the system blossom-p2p replaces
//! (docs/ARCHITECTURE.md, "The system it replaces"), so an empty file is a valid config.
//! Errors name the key and where its value came from (the file, or the `--set`
//! argument), because a user with a typo in a 40-line file needs both.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The whole configuration of a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub model: ModelConfig,
    pub lora: LoraConfig,
    pub train: TrainConfig,
    pub data: DataConfig,
    pub federation: FederationConfig,
    pub network: NetworkConfig,
    pub relay: RelayConfig,
}

/// Which base model to fine-tune.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// A local GGUF file or Hugging Face folder, or `hf:org/name`.
    pub source: String,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            source: crate::default_model::DEFAULT_MODEL_PATH.to_owned(),
        }
    }
}

/// The projections of a Llama-family block, as mlx-lm names them.
pub const ALL_PROJECTIONS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// LoRA or DoRA: the low-rank update that wraps each adapted linear layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FineTuneType {
    Lora,
    Dora,
}

/// The adapter's shape. Defaults are the old system's: 10 layers, rank 8,
/// alpha 16, dropout 0.1, scale 100, DoRA on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    pub fine_tune_type: FineTuneType,
    /// Adapt the last `num_layers` transformer blocks.
    pub num_layers: u32,
    pub rank: u32,
    /// PEFT-style alpha, kept as the old configs had it.
    pub alpha: f64,
    /// mlx-lm's `lora_parameters.scale`: the factor on the low-rank update.
    pub scale: f64,
    pub dropout: f64,
    /// Module paths inside a block to adapt, as mlx-lm names them.
    pub keys: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            fine_tune_type: FineTuneType::Dora,
            num_layers: 10,
            rank: 8,
            alpha: 16.0,
            scale: 100.0,
            dropout: 0.1,
            // mlx-lm's default: every projection of the block.
            keys: ALL_PROJECTIONS.iter().map(|k| k.to_string()).collect(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Optimizer {
    Adamw,
    Adam,
    Sgd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    Constant,
    /// Cosine decay from `learning_rate` to `learning_rate_min` over the whole
    /// run (all rounds), after `warmup_steps` of linear warm-up.
    Cosine,
}

/// Local training. Defaults: batch 1, 10 local steps a round, sequences of at
/// most 512 tokens, and a cosine schedule from 5e-5 down to 1e-6.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub batch_size: u32,
    /// Optimizer steps a node takes each round.
    pub local_steps: u32,
    pub max_seq_length: u32,
    pub learning_rate: f64,
    pub learning_rate_min: f64,
    pub lr_schedule: LrSchedule,
    pub warmup_steps: u32,
    pub optimizer: Optimizer,
    pub grad_accumulation_steps: u32,
    /// Compute the loss on completions / assistant turns only.
    pub mask_prompt: bool,
    /// Pack a batch's rows one after another into as few lines as hold its
    /// longest row (each row sees only itself) instead of padding each row
    /// to the longest: the same loss, less wasted compute.
    pub pack: bool,
    /// With several rows a batch, make batches of rows of similar length
    /// (rows sorted by token count, cut into batches, the batches shuffled
    /// each epoch; evaluation batches sorted too), as mlx_lm does: a batch
    /// is padded to its longest row. Off: rows in a seeded shuffle. One-row
    /// batches are shuffled either way.
    pub group_by_length: bool,
    /// Compile the training step with MLX (traced once per batch shape,
    /// element-wise work fused); off runs it op by op.
    pub compile: bool,
    /// Pad training lines and targets to a multiple of this many tokens, so
    /// that the compiled step sees few shapes. None: 32 for a compiled step
    /// on a GPU, no padding elsewhere (on a CPU padding costs compute).
    pub pad_to: Option<u32>,
    /// On the CPU, split each batch's rows over this many MLX streams (each
    /// its own thread, BLAS single-threaded) computed at once, their losses
    /// and gradients combined by target tokens: the same loss, and cores
    /// that would idle through MLX's single-threaded element-wise work
    /// compute too. None: one stream per core, at most one per row; 1 turns
    /// it off. GPUs run one stream.
    pub cpu_streams: Option<u32>,
    /// With `compile`, make each step (loss, gradients and the optimizer's
    /// update) one compiled function and queue it before the one before it
    /// has finished, so the host builds step n + 1 while the device
    /// computes step n (a step's loss is read once the next is queued).
    /// Off: loss and gradients, then the update, each evaluated in turn.
    /// None: on a GPU, not on a CPU (where the host's cores compute the
    /// step, and the two functions in turn measured faster).
    pub pipeline: Option<bool>,
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            batch_size: 1,
            local_steps: 10,
            max_seq_length: 512,
            learning_rate: 5e-5,
            learning_rate_min: 1e-6,
            lr_schedule: LrSchedule::Cosine,
            warmup_steps: 0,
            optimizer: Optimizer::Adamw,
            grad_accumulation_steps: 1,
            mask_prompt: false,
            pack: false,
            group_by_length: true,
            compile: true,
            pad_to: None,
            cpu_streams: None,
            pipeline: None,
            seed: 0,
        }
    }
}

/// What to train on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// `builtin` (the generated offline task), a local folder of mlx-lm jsonl
    /// files, or `hf:org/name`.
    pub dataset: String,
    /// A minijinja prompt template file; none means the tokenizer's chat template.
    pub template: Option<PathBuf>,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            dataset: "builtin".to_owned(),
            template: None,
        }
    }
}

/// How peers' adapters are combined at the end of a round (docs/PROTOCOL.md, "Averaging").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Aggregation {
    /// Weighted FedAvg of A and B separately: what the Flower server did.
    Fedavg,
    /// Average ΔW = B·A, then re-factor to rank r by SVD.
    Exact,
    Median,
    TrimmedMean,
    NormClip,
}

/// Who trains on which rows (docs/PROTOCOL.md, "Partitions").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Partitioning {
    /// Hash buckets assigned to live peers by rendezvous hashing.
    Hash,
    /// `--partition-id k --num-partitions n`, as the old IID partitioner.
    Static,
}

/// How a round's updates travel (docs/PROTOCOL.md, "The reduce exchange").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeMode {
    /// Every update to every node by gossip; each node averages them all.
    Gossip,
    /// Each slice of the updates to its owners, who average and claim it;
    /// every node takes the checked results.
    Reduce,
}

/// How a round's average moves the adapter the next round trains from
/// (docs/PROTOCOL.md, "The outer step").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OuterOptimizerKind {
    /// The next round starts from the average (FedAvg, the Flower baseline).
    Average,
    /// DiLoCo's outer Nesterov step on the averaged pseudo-gradient, with
    /// `outer_lr` and `outer_momentum`.
    Nesterov,
}

/// How updates travel (docs/PROTOCOL.md, "Compressed updates").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CompressionKind {
    /// Adapters in float32.
    None,
    /// Each round's change in float16, with error feedback.
    Fp16,
    /// Each round's change in int8 blocks of 62 values with a bfloat16
    /// scale, with error feedback.
    Int8,
    /// Each round's change as the 31 largest of every 256 values, int8
    /// with a bfloat16 scale (16x less than float32), with error feedback.
    Topk,
}

/// Rounds and averaging. Defaults: 10 rounds, 10 nodes (in simulation),
/// FedAvg, adapters saved every 5 rounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FederationConfig {
    pub rounds: u32,
    /// Number of nodes `simulate` starts.
    pub nodes: u32,
    pub aggregation: Aggregation,
    /// Fraction cut from each end by `trimmed-mean`.
    pub trim_fraction: f64,
    pub partitioning: Partitioning,
    /// B in bucket(i) = blake3(fingerprint ‖ i) mod B.
    pub num_buckets: u32,
    /// Save the averaged adapter in the mlx-lm format every N rounds.
    pub save_every_rounds: u32,
    /// A round ends at this deadline if no quorum of manifests came first.
    pub round_timeout_secs: u64,
    /// `start` trains round 0 once this many run members (the node
    /// included) are there; `simulate` waits for all of its nodes.
    pub min_members: u32,
    pub exchange: ExchangeMode,
    /// Owners of each slice in the reduce exchange.
    pub replicas: u32,
    /// The share of a slice a node re-computes each round on average (one
    /// slice it did not own with this chance, or an eighth of one with
    /// eight times it where the method is per coordinate), to catch owners
    /// who agree on a wrong result.
    pub audit: f64,
    /// How updates travel: adapters, or each round's change compressed.
    /// Unset: `int8`, or `none` with exact averaging (`compression()`).
    pub compression: Option<CompressionKind>,
    /// The outer step from a round's average to the next round's start.
    pub outer_optimizer: OuterOptimizerKind,
    /// The outer step's learning rate (`nesterov`).
    pub outer_lr: f64,
    /// The outer step's momentum (`nesterov`).
    pub outer_momentum: f64,
}

impl FederationConfig {
    /// How updates travel: as set, else int8 changes (a quarter of float32's
    /// bytes, learning as much: README, "Compressed updates and the outer
    /// step"), or float32 adapters under exact averaging, which multiplies
    /// whole adapters.
    pub fn compression(&self) -> CompressionKind {
        self.compression.unwrap_or(if self.aggregation == Aggregation::Exact { CompressionKind::None } else { CompressionKind::Int8 })
    }
}

impl Default for FederationConfig {
    fn default() -> Self {
        Self {
            rounds: 10,
            nodes: 10,
            aggregation: Aggregation::Fedavg,
            trim_fraction: 0.1,
            partitioning: Partitioning::Hash,
            num_buckets: 1024,
            save_every_rounds: 5,
            round_timeout_secs: 600,
            min_members: 2,
            exchange: ExchangeMode::Reduce,
            replicas: 2,
            audit: 0.1,
            compression: None,
            outer_optimizer: OuterOptimizerKind::Average,
            outer_lr: 0.7,
            outer_momentum: 0.9,
        }
    }
}

/// The libp2p node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// Multiaddrs to listen on.
    pub listen: Vec<String>,
    /// Multiaddrs of peers or relays to dial first.
    pub bootstrap: Vec<String>,
    /// Find peers on the LAN by mDNS.
    pub mdns: bool,
    /// Identity key, chunk store and checkpoints live here.
    pub data_dir: PathBuf,
    /// Pre-shared key of a private network (libp2p pnet).
    pub psk_file: Option<PathBuf>,
    /// A closed run: only these peer ids (one per line) may connect.
    pub allow_peers_file: Option<PathBuf>,
    /// Disk the content store may use, in MB.
    pub store_quota_mb: u64,
    /// Try direct connections through NAT (DCUtR) to peers reached through
    /// a relay; off, a relayed peer stays relayed.
    pub hole_punching: bool,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            listen: vec![
                "/ip4/0.0.0.0/tcp/0".to_owned(),
                "/ip4/0.0.0.0/udp/0/quic-v1".to_owned(),
            ],
            bootstrap: Vec::new(),
            mdns: true,
            data_dir: PathBuf::from(".blossom"),
            psk_file: None,
            allow_peers_file: None,
            store_quota_mb: 4096,
            hole_punching: true,
        }
    }
}

/// What a `relay` lets peers behind NAT use (docs/PROTOCOL.md, "Homes
/// behind NAT"). The defaults carry a run of the default model through the
/// relay alone; libp2p's own (128 KiB or 2 minutes a circuit) do not carry
/// one adapter slice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// Bytes one relayed connection may carry, both ways, before the relay ends it.
    pub max_circuit_bytes: u64,
    /// Seconds one relayed connection may last.
    pub max_circuit_duration_secs: u64,
    /// Slots (reservations) held at once, in all and per peer.
    pub max_reservations: u32,
    pub max_reservations_per_peer: u32,
    /// Relayed connections at once, in all and per peer.
    pub max_circuits: u32,
    pub max_circuits_per_peer: u32,
    /// New relayed connections, and slot requests, one peer may make a
    /// minute (so a relay on a home uplink is not taken over by one peer).
    pub per_peer_per_minute: u32,
    /// Megabits a second the relay reads from one peer, all its circuits
    /// together; 0: no cap. A relay on a home uplink sets it to a share of
    /// the uplink.
    pub max_peer_mbit_per_sec: f64,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            max_circuit_bytes: 4 << 30,
            max_circuit_duration_secs: 24 * 3600,
            max_reservations: 256,
            max_reservations_per_peer: 4,
            max_circuits: 256,
            max_circuits_per_peer: 32,
            per_peer_per_minute: 60,
            max_peer_mbit_per_sec: 0.0,
        }
    }
}

/// Where a bad value came from, so the error can point at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Defaults,
    File(PathBuf),
    Override(String),
    /// A subcommand's own flags, e.g. `start --bootstrap`.
    Flags(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Defaults => write!(f, "built-in defaults"),
            Origin::File(path) => write!(f, "config file {}", path.display()),
            Origin::Override(arg) => write!(f, "--set {arg}"),
            Origin::Flags(command) => write!(f, "flags of `{command}`"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {} is not valid TOML: {message}", path.display())]
    Syntax { path: PathBuf, message: String },
    #[error("--set {arg}: {reason} (expected section.key=value, for example --set lora.rank=16)")]
    BadOverride { arg: String, reason: String },
    #[error("{origin}: {key}: {message}")]
    Invalid {
        origin: Origin,
        key: String,
        message: String,
    },
}

impl Config {
    /// Reads `file` (if any) over the defaults, then applies `overrides`
    /// (`section.key=value`, where value is a TOML value or a bare string),
    /// then checks every range.
    pub fn load(file: Option<&Path>, overrides: &[String]) -> Result<Config, ConfigError> {
        let file_table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                text.parse::<toml::Table>().map_err(|err| ConfigError::Syntax {
                    path: path.to_owned(),
                    message: err.to_string().trim_end().to_owned(),
                })?
            }
            None => toml::Table::new(),
        };
        let file_origin = match file {
            Some(path) => Origin::File(path.to_owned()),
            None => Origin::Defaults,
        };
        // Decode the file alone first, so an error here is the file's fault.
        decode(file_table.clone(), &file_origin)?;

        let mut table = file_table;
        let mut override_args = BTreeMap::new();
        for arg in overrides {
            let (key, value) = parse_override(arg)?;
            set_key(&mut table, &key, value).map_err(|reason| ConfigError::BadOverride {
                arg: arg.clone(),
                reason,
            })?;
            override_args.insert(key, arg.clone());
        }
        let origin_of = |key: &str| match override_args.get(key) {
            Some(arg) => Origin::Override(arg.clone()),
            None => match file.filter(|_| has_key(&table, key)) {
                Some(path) => Origin::File(path.to_owned()),
                None => Origin::Defaults,
            },
        };
        let config = match decode(table.clone(), &Origin::Defaults) {
            Ok(config) => config,
            // The file alone decoded, so an override broke it; blame the last
            // override under the failing key.
            Err(ConfigError::Invalid { key, message, .. }) => {
                let origin = override_args
                    .iter()
                    .rev()
                    .find(|(k, _)| key == "." || k.starts_with(&key) || key.starts_with(k.as_str()))
                    .map(|(_, arg)| Origin::Override(arg.clone()))
                    .unwrap_or_else(|| origin_of(&key));
                return Err(ConfigError::Invalid { origin, key, message });
            }
            Err(other) => return Err(other),
        };
        config.validate().map_err(|(key, message)| ConfigError::Invalid {
            origin: origin_of(&key),
            key,
            message,
        })?;
        Ok(config)
    }

    /// This config with one more `section.key=value` override (as `--set`
    /// takes it), checked as `load` checks: for a variant beside the
    /// configured one (`bench train --against`).
    pub fn with_override(&self, arg: &str) -> Result<Config, ConfigError> {
        let origin = Origin::Override(arg.to_owned());
        let mut table = toml::Table::try_from(self).map_err(|err| ConfigError::BadOverride {
            arg: arg.to_owned(),
            reason: format!("the configuration does not convert to TOML: {err}"),
        })?;
        let (key, value) = parse_override(arg)?;
        set_key(&mut table, &key, value).map_err(|reason| ConfigError::BadOverride { arg: arg.to_owned(), reason })?;
        let config = decode(table, &origin)?;
        config.validate().map_err(|(key, message)| ConfigError::Invalid { origin, key, message })?;
        Ok(config)
    }

    /// Range checks that types alone cannot express. Returns the first bad key
    /// and what is wrong with it.
    pub fn validate(&self) -> Result<(), (String, String)> {
        fn check(ok: bool, key: &str, message: impl Into<String>) -> Result<(), (String, String)> {
            if ok { Ok(()) } else { Err((key.to_owned(), message.into())) }
        }
        fn positive_finite(value: f64) -> bool {
            value.is_finite() && value > 0.0
        }
        let Config {
            model,
            lora,
            train,
            data,
            federation,
            network,
            relay,
        } = self;
        check(!model.source.trim().is_empty(), "model.source", "must name a model file, folder or hf:org/name")?;

        check((1..=512).contains(&lora.num_layers), "lora.num_layers", format!("must be between 1 and 512, got {}", lora.num_layers))?;
        check((1..=4096).contains(&lora.rank), "lora.rank", format!("must be between 1 and 4096, got {}", lora.rank))?;
        check(positive_finite(lora.alpha), "lora.alpha", format!("must be a positive number, got {}", lora.alpha))?;
        check(positive_finite(lora.scale), "lora.scale", format!("must be a positive number, got {}", lora.scale))?;
        check((0.0..1.0).contains(&lora.dropout), "lora.dropout", format!("must be in [0, 1), got {}", lora.dropout))?;
        check(!lora.keys.is_empty(), "lora.keys", "must list at least one module, e.g. [\"self_attn.q_proj\"]")?;
        check(lora.keys.iter().all(|k| !k.trim().is_empty()), "lora.keys", "must not contain an empty name")?;

        check(train.batch_size >= 1, "train.batch_size", "must be at least 1")?;
        if let Some(pad_to) = train.pad_to {
            check((1..=4096).contains(&pad_to), "train.pad_to", format!("must be between 1 and 4096, got {pad_to}"))?;
        }
        if let Some(streams) = train.cpu_streams {
            check((1..=64).contains(&streams), "train.cpu_streams", format!("must be between 1 and 64, got {streams}"))?;
        }
        check(train.local_steps >= 1, "train.local_steps", "must be at least 1")?;
        check((16..=1 << 20).contains(&train.max_seq_length), "train.max_seq_length", format!("must be between 16 and 1048576, got {}", train.max_seq_length))?;
        check(positive_finite(train.learning_rate), "train.learning_rate", format!("must be a positive number, got {}", train.learning_rate))?;
        check(
            train.learning_rate_min.is_finite() && (0.0..=train.learning_rate).contains(&train.learning_rate_min),
            "train.learning_rate_min",
            format!("must be between 0 and train.learning_rate ({}), got {}", train.learning_rate, train.learning_rate_min),
        )?;
        check(train.grad_accumulation_steps >= 1, "train.grad_accumulation_steps", "must be at least 1")?;

        check(!data.dataset.trim().is_empty(), "data.dataset", "must be `builtin`, a folder of jsonl files, or hf:org/name")?;

        check(federation.rounds >= 1, "federation.rounds", "must be at least 1")?;
        check((1..=4096).contains(&federation.nodes), "federation.nodes", format!("must be between 1 and 4096, got {}", federation.nodes))?;
        check((0.0..0.5).contains(&federation.trim_fraction), "federation.trim_fraction", format!("must be in [0, 0.5), got {}", federation.trim_fraction))?;
        check(federation.num_buckets >= 1, "federation.num_buckets", "must be at least 1")?;
        check(federation.save_every_rounds >= 1, "federation.save_every_rounds", "must be at least 1")?;
        check(federation.round_timeout_secs >= 1, "federation.round_timeout_secs", "must be at least 1 second")?;
        check(
            (1..=8).contains(&federation.replicas),
            "federation.replicas",
            "must be 1 to 8 (2, the default, lets every node check each slice against a second owner)",
        )?;
        check(
            (0.0..=1.0).contains(&federation.audit),
            "federation.audit",
            "must be a probability in [0, 1]",
        )?;
        check(
            federation.compression() == CompressionKind::None || federation.aggregation != Aggregation::Exact,
            "federation.compression",
            "compresses each round's change, and exact averaging multiplies whole adapters' A and B: set federation.compression = \"none\" with it, or another aggregation",
        )?;
        check(
            federation.outer_lr.is_finite() && federation.outer_lr > 0.0 && federation.outer_lr <= 10.0,
            "federation.outer_lr",
            format!("must be in (0, 10] (DiLoCo uses 0.7; 1 with outer_momentum = 0 is plain averaging), got {}", federation.outer_lr),
        )?;
        check(
            federation.outer_momentum.is_finite() && (0.0..1.0).contains(&federation.outer_momentum),
            "federation.outer_momentum",
            format!("must be in [0, 1) (DiLoCo uses 0.9), got {}", federation.outer_momentum),
        )?;
        check(
            federation.min_members >= 1,
            "federation.min_members",
            "must be at least 1 (1 trains round 0 alone; 2, the default, waits for a peer)",
        )?;

        check(!network.data_dir.as_os_str().is_empty(), "network.data_dir", "must not be empty")?;
        check(network.store_quota_mb >= 1, "network.store_quota_mb", "must be at least 1 (MB)")?;
        check(relay.max_circuit_bytes >= 1 << 20, "relay.max_circuit_bytes", format!("must be at least 1048576 (1 MiB: a circuit must carry an adapter slice), got {}", relay.max_circuit_bytes))?;
        check(relay.max_circuit_duration_secs >= 60, "relay.max_circuit_duration_secs", format!("must be at least 60, got {}", relay.max_circuit_duration_secs))?;
        check(
            relay.max_peer_mbit_per_sec.is_finite() && relay.max_peer_mbit_per_sec >= 0.0,
            "relay.max_peer_mbit_per_sec",
            format!("must be a number of megabits a second, 0 or more (0: no cap), got {}", relay.max_peer_mbit_per_sec),
        )?;
        for (key, value) in [
            ("relay.max_reservations", relay.max_reservations),
            ("relay.max_reservations_per_peer", relay.max_reservations_per_peer),
            ("relay.max_circuits", relay.max_circuits),
            ("relay.max_circuits_per_peer", relay.max_circuits_per_peer),
        ] {
            check(value >= 1, key, format!("must be at least 1, got {value}"))?;
        }
        for (key, addrs) in [("network.listen", &network.listen), ("network.bootstrap", &network.bootstrap)] {
            if let Some(bad) = addrs.iter().find(|a| !a.starts_with('/')) {
                return Err((key.to_owned(), format!("`{bad}` is not a multiaddr (they start with `/`, e.g. /ip4/1.2.3.4/tcp/4001)")));
            }
        }
        Ok(())
    }
}

/// Decodes a table into a `Config`, naming the key path of any type error.
fn decode(table: toml::Table, origin: &Origin) -> Result<Config, ConfigError> {
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|err| {
        let key = err.path().to_string();
        let message = err.into_inner().to_string();
        // toml appends "in `key`", which the error already says up front.
        let message = message.split("\nin `").next().unwrap_or_default().trim_end().to_owned();
        ConfigError::Invalid {
            origin: origin.clone(),
            key,
            message,
        }
    })
}

/// Splits `section.key=value` and reads the value as TOML (`16`, `true`,
/// `["a", "b"]`), falling back to a bare string (`hf:org/name`).
fn parse_override(arg: &str) -> Result<(String, toml::Value), ConfigError> {
    let bad = |reason: &str| ConfigError::BadOverride {
        arg: arg.to_owned(),
        reason: reason.to_owned(),
    };
    let (key, raw) = arg.split_once('=').ok_or_else(|| bad("missing `=`"))?;
    let key = key.trim();
    if key.is_empty() || key.split('.').any(|part| part.trim().is_empty()) {
        return Err(bad("the key is empty or has an empty part"));
    }
    let raw = raw.trim();
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()));
    Ok((key.to_owned(), value))
}

fn set_key(table: &mut toml::Table, key: &str, value: toml::Value) -> Result<(), String> {
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().ok_or("empty key")?;
    let mut current = table;
    for (depth, part) in parts.iter().enumerate() {
        let entry = current
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{}` is a value, not a section", parts[..=depth].join(".")))?;
    }
    current.insert(last.to_owned(), value);
    Ok(())
}

fn has_key(table: &toml::Table, key: &str) -> bool {
    let mut current = table;
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        match current.get(part) {
            Some(toml::Value::Table(inner)) if parts.peek().is_some() => current = inner,
            Some(_) => return parts.peek().is_none(),
            None => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn override_values_parse_as_toml_or_string() {
        let (key, value) = parse_override("lora.rank=16").expect("valid");
        assert_eq!(key, "lora.rank");
        assert_eq!(value, toml::Value::Integer(16));
        let (_, value) = parse_override("model.source=hf:org/name").expect("valid");
        assert_eq!(value, toml::Value::String("hf:org/name".into()));
        let (_, value) = parse_override("network.bootstrap=[\"/ip4/1.2.3.4/tcp/1\"]").expect("valid");
        assert_eq!(value.as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn has_key_finds_only_present_leaves() {
        let table: toml::Table = "[lora]\nrank = 4\n".parse().expect("toml");
        assert!(has_key(&table, "lora.rank"));
        assert!(!has_key(&table, "lora.alpha"));
        assert!(!has_key(&table, "train.seed"));
    }
}
