//! The round engine (docs/PROTOCOL.md, "A round"): train → publish → collect →
//! average → next round. It sees the trainer only through [`RoundTrainer`]
//! and the network only through its handle and events; docs/PROTOCOL.md
//! explains the choices.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use libp2p::PeerId;
use libp2p_identity::Keypair;
use tokio::sync::{mpsc, watch};

use crate::aggregate::{Contribution, Method, Tensors, aggregate, fedavg_drift};
use crate::p2p::certify::CertificateNews;
use crate::p2p::chunk_protocol::{HeldManifest, held_key};
use crate::p2p::network::{Average, Exchange, NetworkError, NetworkEvent, NetworkHandle, Piece};
use crate::wire::codec::{CHUNK_SIZE, Digest, Limits};
use crate::wire::manifest::{MAX_ADDRESS_LEN, MAX_ADDRESSES, Manifest, ManifestKind, SignedManifest, SliceClaim};
use crate::wire::{inputs, merkle};
use crate::wire::slices::SliceLayout;
use crate::wire::tensors::{decode_checked, encode};

use super::checkpoint::{CheckpointError, CheckpointFile};
use super::misbehaviour::{Misbehaviour, scaled};
use super::partition::{hash_partition, hash_partition_sizes, static_partition};
use super::reduce::{self, SliceInput};


/// What a round of local training produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LocalResult {
    pub loss: f32,
    pub examples: u64,
    pub tokens: u64,
}

/// The trainer as the engine sees it. Adapters cross as plain float
/// tensors, so a fake trainer is enough to test the engine.
pub trait RoundTrainer: Clone + Send + Sync + 'static {
    /// The adapter every node of the run starts from (the same seed gives
    /// the same tensors on every node).
    fn initial(&self) -> impl Future<Output = Result<Tensors, String>> + Send;
    /// Local steps of `round` from `start` on the rows `rows` (indices).
    fn train(&self, start: Tensors, rows: Vec<u64>, round: u64) -> impl Future<Output = Result<(Tensors, LocalResult), String>> + Send;
    /// Loss on the held-out rows.
    fn evaluate(&self, adapter: Tensors) -> impl Future<Output = Result<f32, String>> + Send;
    /// Writes the adapter in the mlx-lm format into `dir`.
    fn save(&self, adapter: Tensors, dir: PathBuf) -> impl Future<Output = Result<(), String>> + Send;
    /// This node's optimizer state, for its checkpoint.
    fn optimizer_state(&self) -> impl Future<Output = Result<Tensors, String>> + Send;
    /// Puts a checkpointed optimizer state back.
    fn restore_optimizer_state(&self, state: Tensors) -> impl Future<Output = Result<(), String>> + Send;
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PartitionMode {
    /// Hash buckets over the round's members (rendezvous hashing).
    Hash { buckets: u32 },
    /// Shard `id` of `count`, whoever else is there.
    Static { id: u32, count: u32 },
}

/// When a round's collection ends if the quorum does not come first.
#[derive(Debug, Clone)]
pub enum RoundClock {
    /// `timeout` of wall time after this node published.
    Wall { timeout: Duration },
    /// Deadlines on the run's schedule: round r ends at start + (r+1)·length.
    Schedule { start: SystemTime, length: Duration },
    /// `timeout` counted only while no node's training is queued or running
    /// (the simulator's nodes share the CPU: a slow CPU must not turn into
    /// lost rounds). The receiver reports the jobs in flight.
    ComputeIdle { timeout: Duration, busy: watch::Receiver<usize> },
}

impl RoundClock {
    /// When the collection of `round`, starting now, ends in wall time, if
    /// that is known in advance.
    fn wall_deadline(&self, round: u64) -> Option<SystemTime> {
        match self {
            RoundClock::Wall { timeout } => Some(SystemTime::now() + *timeout),
            RoundClock::Schedule { start, length } => Some(*start + *length * (round as u32 + 1)),
            RoundClock::ComputeIdle { .. } => None,
        }
    }

    /// Sleeps until the collection deadline of `round`.
    async fn deadline(&mut self, round: u64) {
        self.share_of_deadline(round, 1).await
    }

    /// The collection deadline of `round` as a future that owns its clock
    /// (one that can be replaced by a fresh deadline).
    fn owned_deadline(self, round: u64) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(async move {
            let mut clock = self;
            clock.deadline(round).await;
        })
    }

    /// Sleeps half of the time left until the collection deadline of `round`.
    async fn halfway(&mut self, round: u64) {
        self.share_of_deadline(round, 2).await
    }

    /// Sleeps 1/`parts` of the time left until the collection deadline of `round`.
    async fn share_of_deadline(&mut self, round: u64, parts: u32) {
        match self {
            RoundClock::Wall { timeout } => tokio::time::sleep(*timeout / parts).await,
            RoundClock::Schedule { .. } => {
                let left = self.wall_deadline(round).and_then(|end| end.duration_since(SystemTime::now()).ok()).unwrap_or_default();
                tokio::time::sleep(left / parts).await;
            }
            RoundClock::ComputeIdle { timeout, .. } => {
                let share = *timeout / parts;
                self.wait(share).await
            }
        }
    }

    /// Sleeps `duration` of this clock's time (idle time for ComputeIdle).
    async fn wait(&mut self, duration: Duration) {
        match self {
            RoundClock::Wall { .. } | RoundClock::Schedule { .. } => tokio::time::sleep(duration).await,
            RoundClock::ComputeIdle { busy, .. } => {
                let mut left = duration;
                // Bounded: every pass either ends or spends idle time.
                loop {
                    if busy.wait_for(|jobs| *jobs == 0).await.is_err() {
                        // The compute service is gone; fall back to wall time.
                        return tokio::time::sleep(left).await;
                    }
                    let started = tokio::time::Instant::now();
                    tokio::select! {
                        _ = tokio::time::sleep(left) => return,
                        _ = busy.wait_for(|jobs| *jobs > 0) => {
                            left = left.saturating_sub(started.elapsed());
                            if left.is_zero() {
                                return;
                            }
                        }
                    }
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub run_id: Digest,
    /// Rounds of the whole run (the node stops after the last).
    pub rounds: u64,
    pub method: Method,
    pub partition: PartitionMode,
    pub fingerprint: String,
    /// Indices of the training rows.
    pub train_rows: Arc<Vec<u64>>,
    pub clock: RoundClock,
    /// Ask peers for the newest average before the first round.
    pub catch_up: bool,
    /// Round 0 starts once this many run members, this node included, have
    /// announced themselves (Flower's `min_available_clients`).
    pub min_members: usize,
    /// After the quorum, updates are still taken for this long (clock time):
    /// late joiners' and, in round 0, those of peers not yet known.
    pub grace: Duration,
    /// Evaluate every average on the held-out rows.
    pub evaluate: bool,
    /// Save the average in the mlx-lm format every N rounds into `save_dir/round-NNNN`.
    pub save_every: u32,
    pub save_dir: Option<PathBuf>,
    pub limits: Limits,
    /// Report how far FedAvg's result is from the exact average each round.
    pub measure_drift: bool,
    /// Checkpoint after every round, and resume from it at start.
    pub checkpoint: Option<CheckpointFile>,
    /// The examples an honest node trains on in a round when it has rows
    /// (`node::examples_per_round`: steps × accumulation × batch; a node
    /// without rows trains on none). An update's weight is one of these
    /// two values; a manifest claiming anything else is rejected.
    pub examples_per_round: u64,
    /// How updates travel: whole to everyone, or by slice to their owners.
    pub exchange: Exchange,
    /// Owners of each slice in the reduce exchange.
    pub replicas: usize,
    /// In the reduce exchange, the chance that a node recomputes one slice
    /// it did not own each round and checks its owners' result.
    pub audit: f64,
    /// `simulate --attack …` only: what this attacking node does wrong.
    pub misbehaviour: Option<Misbehaviour>,
}

/// A member of a round as this node saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberView {
    pub peer: PeerId,
    /// The newest round it published an update for, as far as this node knows.
    pub newest_round: Option<u64>,
    /// Its training rows this round (hash partitions; unknown for static ones).
    pub rows: Option<usize>,
}

/// One round, as this node lived it.
#[derive(Debug, Clone)]
pub struct RoundReport {
    pub round: u64,
    pub average_hash: Digest,
    pub average: Arc<Tensors>,
    /// The average this node trained from.
    pub parent: Digest,
    pub contributors: usize,
    pub expected: usize,
    /// True if the deadline, not the quorum, ended the round.
    pub timed_out: bool,
    pub rows: usize,
    pub local: LocalResult,
    pub eval_loss: Option<f32>,
    /// Of this round's contributors, the fraction that trained from the same
    /// average as this node: agreement on round r−1's average.
    pub agreement_before: f64,
    /// ‖FedAvg update − exact average update‖ / ‖exact‖, if measured.
    pub fedavg_drift: Option<f64>,
    pub elapsed: Duration,
    pub members: Vec<MemberView>,
    /// Slices of the average this node computed (the reduce exchange):
    /// its own, and those it took over, found contested, waited for in
    /// vain or audited.
    pub slices_computed: Option<usize>,
}

#[derive(Debug, Clone)]
pub enum EngineEvent {
    Listening(libp2p::Multiaddr),
    PeerConnected(PeerId),
    /// Catch-up found an adapter: training resumes at `round`.
    CaughtUp { round: u64, from: Digest },
    /// The node's own checkpoint: training resumes at `round`.
    Resumed { round: u64 },
    /// The update of `round` is out; collection ends by `deadline` at the
    /// latest (unknown in advance for an idle-time clock).
    Collecting { round: u64, deadline: Option<SystemTime> },
    /// Round 0 waits for its members: `known` of `wanted` have announced
    /// themselves (this node included).
    Waiting { known: usize, wanted: usize },
    /// Round 0's member list is settled: every node that announced itself
    /// in time. `member` is false for a node that came after round 0 began:
    /// it averages round 0 without training in it.
    Members { count: usize, member: bool },
    Round(RoundReport),
    /// Two thirds of a round's contributors attested this node's average of
    /// it: the certificate late joiners now get from this node.
    Certified { round: u64, average: Digest, signers: usize, contributors: usize },
    Rejected { peer: PeerId, reason: String },
    /// `peer` is proven to misbehave and left out of the run for good.
    Quarantined { peer: PeerId, reason: String },
    Finished,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("trainer: {0}")]
    Trainer(String),
    #[error("network: {0}")]
    Network(String),
    #[error("averaging: {0}")]
    Aggregate(String),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

/// A peer's update for some round (its tensors: in the gossip exchange,
/// and this node's own).
#[derive(Clone)]
struct Update {
    manifest: Manifest,
    tensors: Option<Tensors>,
}

/// What a slice owner claimed a slice over some inputs is.
#[derive(Debug, Clone, PartialEq)]
struct ClaimSeen {
    result: Digest,
    chunk_size: u32,
}

/// One pass of the reduce exchange: its inputs and how they are sliced.
struct RoundView<'a> {
    round: u64,
    digest: Digest,
    layout: &'a SliceLayout,
    sources: &'a [InputSource],
}

/// Each slice's standby (`Engine::slice_owners`), if it has one.
type Standbys = Vec<Option<PeerId>>;

/// How many slices one node computed in a round of the reduce exchange,
/// by why (`Engine::reduce_round`).
#[derive(Debug, Default)]
struct ComputedSlices {
    owned: usize,
    contested: usize,
    retried: usize,
    taken_over: usize,
    late: usize,
    audited: usize,
}

impl ComputedSlices {
    fn total(&self) -> usize {
        self.owned + self.contested + self.retried + self.taken_over + self.late + self.audited
    }
}

/// The reduce exchange's input lists of one round, as `adopt_inputs` met them.
#[derive(Default)]
struct Adoption {
    adopted: usize,
    /// Fetched and decoded, by hash.
    lists: BTreeMap<Digest, Vec<(PeerId, Digest)>>,
    /// Lists that cannot be adopted (malformed, other updates than this
    /// node holds, excluded authors, too few real owners).
    refused: BTreeSet<Digest>,
    /// Lists for which peers were asked for the round's manifests.
    asked: BTreeSet<Digest>,
    /// Fetches of each list so far.
    fetches: BTreeMap<Digest, usize>,
    /// Authors whose updates this node could not fetch: a list with one of
    /// them cannot be computed here.
    unavailable: BTreeSet<PeerId>,
}

/// Where a slice computation reads one input from.
#[derive(Clone)]
struct InputSource {
    author: PeerId,
    examples: u64,
    adapter: Digest,
    /// The Merkle root over its chunk ids (the signed one, or computed from
    /// the signed list), and their count.
    root: Digest,
    count: usize,
    chunk_size: usize,
    /// This node's own update, in full.
    own: Option<Arc<Vec<u8>>>,
}

/// The best certified average seen while catching up.
struct Candidate {
    /// (signers, round): how candidates rank (docs/SECURITY.md, "Round certificates").
    rank: (usize, u64),
    round: u64,
    hash: Digest,
    tensors: Tensors,
}

/// How many rounds ahead of this node updates are kept.
const LOOKAHEAD: u64 = 2;
/// Slice claims kept per (round, inputs, slice), and claimed results in all.
const MAX_CLAIMS_PER_SLICE: usize = 8;
const MAX_SLICE_RESULTS: usize = 16_384;
/// Passes of the reduce exchange in one round: each drops the inputs that
/// no peer could serve (an author that crashed after publishing), or
/// adopts the inputs that more owners averaged (`adopt_inputs`).
const REDUCE_PASSES: usize = 4;
/// How many more deadlines a round waits for members one round behind.
const MAX_DEADLINE_EXTENSIONS: u32 = 2;
/// Input lists a node adopts in one round at most, and the fetches of one
/// list it tries.
const MAX_ADOPTIONS: usize = 2;
const MAX_LIST_FETCHES: usize = 3;
/// Certificates offered during one catch-up kept at most.
const MAX_OFFERED: usize = 256;
/// How long a node that finished its last round waits for that round's
/// certificate (its peers' attestations), so late joiners and seeding
/// relays can take the final average.
const FINAL_CERTIFICATE_WAIT: Duration = Duration::from_secs(10);
/// Round-0 member announcements kept at most (each needs its own key, but
/// keys are free: memory stays bounded whatever peers send).
const MAX_ANNOUNCED: usize = 4096;
/// How many times (a second apart) a node asks for round 0's announcements
/// when its peers trained with a member list it cannot make up yet.
const ROUND_ZERO_ASKS: usize = 10;

pub struct Engine<T: RoundTrainer> {
    pub net: NetworkHandle,
    pub events: mpsc::Receiver<NetworkEvent>,
    pub keypair: Keypair,
    pub trainer: T,
    pub settings: EngineSettings,
    pub reports: mpsc::UnboundedSender<EngineEvent>,
    /// Updates by round and author.
    buffered: BTreeMap<u64, BTreeMap<PeerId, Update>>,
    candidate: Option<Candidate>,
    /// The newest round each peer published an update for: who is active.
    recent_authors: HashMap<PeerId, u64>,
    /// Connected peers that never published and let a round's deadline
    /// pass. They are not waited for again until they publish: a silent
    /// subscriber costs the run one deadline, not one a round.
    silent: HashSet<PeerId>,
    /// Peers that announced themselves as members of round 0.
    announced: BTreeSet<PeerId>,
    /// This node's newest update, encoded (it reads its own slices from it).
    own_update: Option<Arc<Vec<u8>>>,
    /// Slice claims by (round, inputs digest, slice) and owner.
    claims: BTreeMap<(u64, Digest, u32), BTreeMap<PeerId, ClaimSeen>>,
    /// Claimed slice results' chunks (at most 256 KiB each), by hash, with their round.
    slice_results: HashMap<Digest, (u64, Vec<u8>)>,
    /// Owners proven to have claimed a wrong slice, and the proof: left out
    /// of the run.
    excluded: HashMap<PeerId, String>,
    /// The layout every adapter must have (the node's own initial adapter).
    layout: Tensors,
    /// Quarantined on proof that reaches every node (gossiped evidence, a
    /// signed manifest no honest node signs): their updates leave a round's
    /// inputs even mid-round, as they do everywhere else.
    convicted: HashSet<PeerId>,
    /// Certificates peers served while catching up: (signers, round) by
    /// average hash. Only these averages are taken.
    offered: HashMap<Digest, (usize, u64)>,
    /// The newest round of this node's own averages that was certified.
    certified_round: Option<u64>,
}

impl<T: RoundTrainer> Engine<T> {
    pub fn new(
        net: NetworkHandle,
        events: mpsc::Receiver<NetworkEvent>,
        keypair: Keypair,
        trainer: T,
        settings: EngineSettings,
        reports: mpsc::UnboundedSender<EngineEvent>,
    ) -> Self {
        Self {
            net,
            events,
            keypair,
            trainer,
            settings,
            reports,
            buffered: BTreeMap::new(),
            candidate: None,
            recent_authors: HashMap::new(),
            silent: HashSet::new(),
            announced: BTreeSet::new(),
            own_update: None,
            claims: BTreeMap::new(),
            slice_results: HashMap::new(),
            excluded: HashMap::new(),
            layout: Tensors::new(),
            offered: HashMap::new(),
            certified_round: None,
            convicted: HashSet::new(),
        }
    }

    fn me(&self) -> PeerId {
        self.net.peer_id
    }

    /// Asks peers for `round`'s updates (and round 0's announcements) that
    /// this node lacks: it names those it holds (its buffered ones, those
    /// of `holding`, its own), and peers leave them out of their answers.
    async fn ask_round(&self, round: u64, holding: impl IntoIterator<Item = PeerId>) -> Result<(), EngineError> {
        let me = self.me();
        let buffered = self.buffered.get(&round).into_iter().flat_map(|b| b.keys().copied());
        let mut held: Vec<HeldManifest> = buffered.chain(holding).chain([me]).map(|a| held_key(ManifestKind::Update, &a)).collect();
        if round == 0 {
            held.extend(self.announced.iter().chain([&me]).map(|a| held_key(ManifestKind::Members, a)));
        }
        held.sort_unstable();
        held.dedup();
        self.net.ask_round(self.settings.run_id, round, held).await.map_err(|e| EngineError::Network(e.to_string()))
    }

    fn report(&self, event: EngineEvent) {
        // A reader that went away only means nobody watches.
        let _ = self.reports.send(event);
    }

    /// Handles one network event: buffers updates of rounds
    /// `from..=from+LOOKAHEAD` (while catching up, `from` is unknown, the
    /// newest rounds are kept and the newest average is remembered),
    /// reports rejections.
    fn on_network_event(&mut self, event: NetworkEvent, from: Option<u64>) {
        let (manifest, author, bytes) = match event {
            NetworkEvent::AdapterReady { manifest, author, bytes } => (manifest, author, Some(bytes)),
            NetworkEvent::Manifest { manifest, author } => match manifest.kind {
                ManifestKind::Members => return self.on_announcement(&manifest, author),
                // In the reduce exchange an update is only its manifest here;
                // a slice claim is kept as it comes (its chunk follows).
                ManifestKind::Update if self.settings.exchange == Exchange::Reduce => (manifest, author, None),
                ManifestKind::Slice => return self.on_claim(&manifest, author, from),
                ManifestKind::Update | ManifestKind::Average | ManifestKind::Attestation => return,
            },
            NetworkEvent::Certified(news) => return self.on_certified(news),
            NetworkEvent::Quarantined { peer, reason } => return self.quarantine(peer, reason, Conviction::Public),
            NetworkEvent::Rejected { peer, reason } => return self.report(EngineEvent::Rejected { peer, reason }),
            NetworkEvent::Listening(addr) => return self.report(EngineEvent::Listening(addr)),
            NetworkEvent::PeerConnected(peer) => return self.report(EngineEvent::PeerConnected(peer)),
            NetworkEvent::DialFailed { peer, error } => return tracing::debug!(?peer, %error, "a dial failed"),
        };
        if manifest.run_id != self.settings.run_id || author == self.me() || self.excluded.contains_key(&author) {
            return;
        }
        if let Err(reason) = self.check_claims(&manifest) {
            // No honest node signs this: the signed manifest is the proof.
            tracing::warn!(peer = %author, round = manifest.round, %reason, "rejected an adapter");
            self.report(EngineEvent::Rejected { peer: author, reason: reason.clone() });
            return self.quarantine(author, reason, Conviction::Public);
        }
        if manifest.kind == ManifestKind::Slice {
            if let Some(bytes) = bytes.filter(|_| in_window(manifest.round, from)) {
                self.keep_slice_results(&manifest, &bytes);
            }
            return;
        }
        let tensors = match bytes.map(|b| decode_checked(&b, &self.layout, &self.settings.limits)).transpose() {
            Ok(t) => t,
            Err(reason) => {
                tracing::warn!(peer = %author, round = manifest.round, %reason, "rejected an adapter");
                return self.report(EngineEvent::Rejected { peer: author, reason });
            }
        };
        if manifest.kind == ManifestKind::Average {
            // Averages come only inside certificates (the network checked
            // them); the one backed by the most signers wins.
            if let Some(tensors) = tensors
                && from.is_none()
                && let Some(&(signers, round)) = self.offered.get(&manifest.adapter_hash)
                && round == manifest.round
                && self.candidate.as_ref().is_none_or(|c| (signers, round) > c.rank)
            {
                self.candidate = Some(Candidate {
                    rank: (signers, round),
                    round: manifest.round,
                    hash: manifest.adapter_hash,
                    tensors,
                });
            }
            return;
        }
        let newest = self.recent_authors.entry(author).or_insert(manifest.round);
        *newest = (*newest).max(manifest.round);
        self.silent.remove(&author);
        // Never average a stale adapter into a newer round.
        if let Some(from) = from
            && let last = from.saturating_add(LOOKAHEAD)
            && (manifest.round < from || manifest.round > last)
        {
            let reason = format!("round {} outside the round window {from}..={last}", manifest.round);
            tracing::debug!(peer = %author, %reason, "ignored an update");
            return self.report(EngineEvent::Rejected { peer: author, reason });
        }
        let round = self.buffered.entry(manifest.round).or_default();
        match round.get(&author) {
            Some(existing) if existing.manifest.adapter_hash != manifest.adapter_hash => {
                let reason = format!("a second, different update for round {}", manifest.round);
                self.report(EngineEvent::Rejected { peer: author, reason });
            }
            Some(_) => {}
            None => {
                round.insert(author, Update { manifest, tensors });
            }
        }
        bound_rounds(&mut self.buffered, from);
    }

    /// A certificate: this node's own average certified (reported), or one a
    /// peer served (a catch-up candidate, for a round the run has).
    fn on_certified(&mut self, news: CertificateNews) {
        if news.run_id != self.settings.run_id {
            return;
        }
        if news.own {
            self.certified_round = self.certified_round.max(Some(news.round));
            tracing::info!(round = news.round, signers = news.signers, contributors = news.contributors, "average certified");
            return self.report(EngineEvent::Certified {
                round: news.round,
                average: news.average,
                signers: news.signers,
                contributors: news.contributors,
            });
        }
        // One key can certify an average of its own alone: a certificate
        // needs two contributors (one in a run whose quorum is one). Not
        // the whole round-0 quorum: churn leaves later rounds fewer.
        let quorate = news.contributors >= self.settings.min_members.clamp(1, 2);
        if quorate && news.round < self.settings.rounds && (self.offered.len() < MAX_OFFERED || self.offered.contains_key(&news.average)) {
            self.offered.insert(news.average, (news.signers, news.round));
        }
    }

    /// Keeps the slice results of a claim whose chunks arrived (checked
    /// against the claim's hash by the network), each under its chunk id;
    /// whether they are believed is for `reduce_round`.
    fn keep_slice_results(&mut self, manifest: &Manifest, bytes: &[u8]) {
        let Some(claim) = &manifest.slice else { return };
        let Ok(layout) = SliceLayout::with_chunk_size(&self.layout, manifest.chunk_size as usize) else { return };
        let mut held: usize = self.slice_results.values().map(|(_, b)| b.len()).sum();
        let mut rest = bytes;
        for (index, id) in claim.indices.iter().zip(&manifest.chunk_ids) {
            let len = if (*index as usize) < layout.count() { layout.range(*index as usize).len() } else { return };
            let Some((result, tail)) = rest.split_at_checked(len) else { return };
            rest = tail;
            held = held.saturating_add(result.len());
            if Digest::of(result) != *id || self.slice_results.len() >= MAX_SLICE_RESULTS || held > self.settings.limits.max_adapter_bytes.saturating_mul(4) {
                return;
            }
            self.slice_results.insert(*id, (manifest.round, result.to_vec()));
        }
    }

    /// Keeps a slice owner's claim for a round in the window (one per owner,
    /// inputs and slice; a second, different one from the same owner over
    /// the same inputs is equivocation, and the first stands; a claim over
    /// other inputs is not: an owner that drops an unavailable input or
    /// adopts its peers' inputs claims its slices again).
    fn on_claim(&mut self, manifest: &Manifest, author: PeerId, from: Option<u64>) {
        let ours = manifest.run_id == self.settings.run_id && author != self.me() && !self.excluded.contains_key(&author);
        let Some(claim) = manifest.slice.as_ref().filter(|_| ours && in_window(manifest.round, from)) else { return };
        for (index, result) in claim.indices.iter().zip(&manifest.chunk_ids) {
            let key = (manifest.round, claim.inputs, *index);
            if !self.claims.contains_key(&key) && self.claims.len() >= MAX_SLICE_RESULTS {
                return;
            }
            let claims = self.claims.entry(key).or_default();
            if claims.len() >= MAX_CLAIMS_PER_SLICE {
                continue;
            }
            let seen = ClaimSeen {
                result: *result,
                chunk_size: manifest.chunk_size,
            };
            match claims.get(&author) {
                Some(first) if *first != seen => {
                    let reason = format!("two different claims for slice {index} of round {} over the same inputs", manifest.round);
                    self.report(EngineEvent::Rejected { peer: author, reason });
                }
                Some(_) => {}
                None => {
                    claims.insert(author, seen);
                }
            }
        }
    }

    /// Keeps a round-0 member announcement of this run (verified by the
    /// network: round 0, no adapter); other manifests come with their bytes.
    fn on_announcement(&mut self, manifest: &Manifest, author: PeerId) {
        let ours = manifest.run_id == self.settings.run_id && author != self.me();
        if manifest.kind == ManifestKind::Members && ours && self.announced.len() < MAX_ANNOUNCED {
            self.announced.insert(author);
        }
    }

    /// What a peer's manifest says that every node can check for itself:
    /// its round is one of the run's (so no round arithmetic can overflow,
    /// and a forged "average of round 1000" in a 10-round run is refused),
    /// and its example count is one an honest node can produce.
    fn check_claims(&self, manifest: &Manifest) -> Result<(), String> {
        if manifest.round >= self.settings.rounds {
            return Err(format!(
                "round {} outside the round window 0..={} of the run",
                manifest.round,
                self.settings.rounds.saturating_sub(1)
            ));
        }
        let full = self.settings.examples_per_round;
        if manifest.kind == ManifestKind::Update && manifest.examples != 0 && manifest.examples != full {
            return Err(format!(
                "claims {} examples for its round; an update is trained on {full} (steps × accumulation × batch) or 0: wrong weight",
                manifest.examples
            ));
        }
        Ok(())
    }

    /// Runs `work` while handling network events (the event channel is
    /// bounded: leaving it undrained would stall the swarm).
    async fn while_listening<R>(&mut self, work: impl Future<Output = R>, round: Option<u64>) -> Result<R, EngineError> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                result = &mut work => return Ok(result),
                event = self.events.recv() => match event {
                    Some(event) => self.on_network_event(event, round),
                    None => return Err(EngineError::Network("the network task stopped".into())),
                },
            }
        }
    }

    async fn sleep_listening(&mut self, duration: Duration, round: Option<u64>) -> Result<(), EngineError> {
        self.while_listening(tokio::time::sleep(duration), round).await
    }

    /// Asks peers for the newest average and waits for it: `Some((round to
    /// train next, adapter))`, or `None` to start at round 0 (the run has
    /// not finished a round yet), or when the average found is not past
    /// round `past`: a node never goes back to a round it has averaged.
    async fn catch_up(&mut self, past: Option<u64>) -> Result<Option<(u64, Tensors)>, EngineError> {
        self.candidate = None;
        self.offered.clear();
        // Bounded: about 20 s of asking.
        for attempt in 0..10 {
            let peers = self.net.connected_peers().await.map_err(|e| EngineError::Network(e.to_string()))?;
            if !peers.is_empty() {
                if let Err(e) = self.net.catch_up(self.settings.run_id).await {
                    tracing::debug!(error = %e, "catch-up request");
                }
            }
            // Answers need a fetch of the adapter's chunks: give them up to
            // two seconds, looking every quarter.
            for _ in 0..8 {
                self.sleep_listening(Duration::from_millis(250), None).await?;
                if self.candidate.is_some() {
                    break;
                }
            }
            if let Some(candidate) = self.candidate.take() {
                // Below `rounds` (check_claims), so this cannot overflow.
                let next = candidate.round.saturating_add(1);
                if past.is_some_and(|round| next <= round) {
                    return Ok(None);
                }
                self.report(EngineEvent::CaughtUp { round: next, from: candidate.hash });
                tracing::info!(round = next, from = %candidate.hash, "caught up");
                return Ok(Some((next, candidate.tensors)));
            }
            let newest_update = self.buffered.keys().next_back().copied();
            // Peers train round 0 and have no average yet: join them.
            let in_round_zero = newest_update == Some(0);
            // Peers were asked three times and nothing is moving: this run
            // has not started yet.
            let not_started = attempt >= 2 && !peers.is_empty() && newest_update.is_none();
            if in_round_zero || not_started {
                return Ok(None);
            }
        }
        // Updates go round but no certified average came. A peer's update
        // is one peer's word (it could be anything): start where this node
        // is, and rejoin once a certificate can be had (`overtaken`).
        tracing::warn!("no certified average came; peers' updates are not taken as a starting point");
        Ok(None)
    }

    fn rows(&self, members: &[PeerId]) -> Vec<u64> {
        match self.settings.partition {
            PartitionMode::Static { id, count } => static_partition(&self.settings.train_rows, id, count),
            PartitionMode::Hash { buckets } => {
                let peers: Vec<Vec<u8>> = members.iter().map(|p| p.to_bytes()).collect();
                hash_partition(&self.settings.fingerprint, &self.settings.train_rows, buckets, &peers, &self.me().to_bytes())
            }
        }
    }

    /// Every member's newest round and share of the rows, for the report.
    fn member_views(&self, members: &[PeerId], round: u64) -> Vec<MemberView> {
        let sizes = match self.settings.partition {
            PartitionMode::Hash { buckets } => {
                let peers: Vec<Vec<u8>> = members.iter().map(|p| p.to_bytes()).collect();
                hash_partition_sizes(&self.settings.fingerprint, &self.settings.train_rows, buckets, &peers).into_iter().map(Some).collect()
            }
            PartitionMode::Static { .. } => vec![None; members.len()],
        };
        members
            .iter()
            .zip(sizes)
            .map(|(peer, rows)| MemberView {
                peer: *peer,
                newest_round: if *peer == self.me() { Some(round) } else { self.recent_authors.get(peer).copied() },
                rows,
            })
            .collect()
    }

    fn sign(&self, manifest: &Manifest) -> Result<SignedManifest, EngineError> {
        SignedManifest::sign(manifest, &self.keypair).map_err(|e| EngineError::Network(e.to_string()))
    }

    /// Signs and gossips this node's update of `round`, and keeps it for the
    /// round's average.
    async fn publish_update(&mut self, round: u64, parent: Digest, update: Tensors, local: &LocalResult, chunks: (usize, Option<Digest>)) -> Result<(), EngineError> {
        let (chunk_size, members) = chunks;
        let bytes = encode(&update).map_err(EngineError::Aggregate)?;
        let described = Manifest::describe_chunked(self.settings.run_id, round, &self.me(), &bytes, chunk_size);
        // In the reduce exchange owners fetch slices with proofs: one root
        // instead of S chunk ids in a manifest every node receives.
        let described = if self.settings.exchange == Exchange::Reduce { described.rooted() } else { described };
        let inflated = self.settings.misbehaviour == Some(Misbehaviour::InflateWeight) && local.examples > 0;
        let manifest = Manifest {
            parent: Some(parent),
            examples: if inflated { local.examples.saturating_mul(1000) } else { local.examples },
            tokens: local.tokens,
            train_loss: local.loss,
            members,
            addresses: self.addresses().await,
            ..described
        };
        let signed = self.sign(&manifest)?;
        let bytes_kept = bytes.clone();
        match self.net.publish(signed, manifest.clone(), bytes).await {
            Ok(()) => {}
            // A node that cannot keep its own update cannot serve it.
            Err(e @ NetworkError::Store(_)) => return Err(EngineError::Network(e.to_string())),
            // No peer in the topic right now: the update stays in the store
            // for fetches, and the round goes on.
            Err(e) => tracing::warn!(round, error = %e, "could not gossip the update"),
        }
        self.misbehave_with(&manifest, &update).await?;
        let me = self.me();
        self.own_update = Some(Arc::new(bytes_kept));
        self.buffered.entry(round).or_default().insert(me, Update { manifest, tensors: Some(update) });
        Ok(())
    }

    /// `simulate --attack equivocate | future-round`: after its real update,
    /// an attacker publishes another one for the same round (×100), or the
    /// same one under rounds the run does not have.
    async fn misbehave_with(&mut self, manifest: &Manifest, update: &Tensors) -> Result<(), EngineError> {
        let forgeries: Vec<(Manifest, Vec<u8>)> = match self.settings.misbehaviour {
            Some(Misbehaviour::Equivocate) => {
                let bytes = encode(&scaled(update, 100.0)).map_err(EngineError::Aggregate)?;
                let described = Manifest::describe_chunked(manifest.run_id, manifest.round, &self.me(), &bytes, manifest.chunk_size as usize);
                let described = if manifest.chunk_root.is_some() { described.rooted() } else { described };
                let other = Manifest {
                    adapter_hash: described.adapter_hash,
                    chunk_ids: described.chunk_ids,
                    chunk_root: described.chunk_root,
                    ..manifest.clone()
                };
                vec![(other, bytes)]
            }
            Some(Misbehaviour::FutureRound) => {
                let bytes = encode(update).map_err(EngineError::Aggregate)?;
                [manifest.round.saturating_add(1000), u64::MAX].into_iter().map(|round| (Manifest { round, ..manifest.clone() }, bytes.clone())).collect()
            }
            _ => Vec::new(),
        };
        for (forged, bytes) in forgeries {
            let signed = self.sign(&forged)?;
            if let Err(e) = self.net.publish_unguarded(signed, forged, bytes).await {
                tracing::debug!(error = %e, "a forgery was not gossiped");
            }
        }
        Ok(())
    }

    /// `simulate --attack fake-average`: in place of its real average, a
    /// poisoned one (×100), certified by the attacker alone as the average
    /// of an input list naming only itself; it serves that to joiners.
    fn fake_average(&self, round: u64, average: &Tensors) -> Result<Average, EngineError> {
        let me = self.me();
        let bytes = encode(&scaled(average, 100.0)).map_err(EngineError::Aggregate)?;
        let inputs = inputs::encode_inputs(&[(me, Digest::of(&bytes))]);
        let manifest = Manifest {
            kind: ManifestKind::Average,
            inputs: Some(Digest::of(&inputs)),
            ..Manifest::describe(self.settings.run_id, round, &me, &bytes)
        };
        self.attested(manifest, bytes, inputs)
    }

    /// An average manifest (naming the digest of `inputs`), signed, with
    /// this node's signed attestation of it: what `keep_average` takes.
    fn attested(&self, manifest: Manifest, bytes: Vec<u8>, inputs: Vec<u8>) -> Result<Average, EngineError> {
        let digest = Digest::of(&inputs);
        let attestation = Manifest::attestation(manifest.run_id, manifest.round, &self.me(), manifest.adapter_hash, manifest.adapter_len, digest);
        Ok(Average {
            signed: self.sign(&manifest)?,
            attestation: self.sign(&attestation)?,
            manifest,
            bytes,
            inputs,
        })
    }

    /// The reduce exchange's average of `updates` (docs/PROTOCOL.md, "The
    /// reduce exchange"): this node computes the slices it owns and claims
    /// them, takes every other slice from its owners when all of them claim
    /// the same result over the same inputs, and computes a slice itself
    /// when they disagree, are missing by the deadline, or it audits the
    /// slice. An owner whose claim differs from the slice computed from the
    /// signed inputs is excluded from the run. Inputs that nobody could
    /// serve (their author left) are dropped, and the exchange runs again
    /// over the rest. Returns the average, its encoding and the inputs count,
    /// or where to rejoin when most peers went two rounds on meanwhile.
    async fn reduce_round(&mut self, round: u64, current: &Tensors, mut updates: BTreeMap<PeerId, Update>) -> Result<Reduced, EngineError> {
        let previous = Arc::new(encode(current).map_err(EngineError::Aggregate)?);
        // An adapter of another length cannot have the run's layout.
        for (author, update) in &updates {
            if update.manifest.adapter_len != previous.len() as u64 {
                let reason = format!("an update of {} bytes; the run's adapters have {}", update.manifest.adapter_len, previous.len());
                self.report(EngineEvent::Rejected { peer: *author, reason });
            }
        }
        updates.retain(|_, u| u.manifest.adapter_len == previous.len() as u64);
        let me = self.me();
        let mut deadline = self.settings.clock.clone().owned_deadline(round);
        let mut deadline_passed = false;
        // Past the first deadline, each slice's standby (the next author on
        // the ring) computes and claims what its owners have not, and the
        // others wait one deadline more (once a round).
        let mut took_over = false;
        let mut adoption = Adoption::default();
        // Why this node computed the slices it did, logged when the round
        // settles: past the owners' share it is work (and inputs fetched)
        // that the owners' claims should have saved.
        let mut computed = ComputedSlices::default();
        // Asked once: a node that cannot catch up waits for the deadline.
        let mut rejoin_tried = false;
        for pass in 0..REDUCE_PASSES {
            // Authors convicted meanwhile are no inputs, nor owners.
            updates.retain(|author, _| !self.convicted.contains(author));
            if updates.is_empty() {
                // Every input's author is gone for this node (it came too
                // late to fetch them): peers that finished the round have
                // an average to rejoin from.
                if let Some((round, adapter)) = self.catch_up(Some(round)).await? {
                    return Ok(Reduced::Rejoin { round, adapter });
                }
                return Err(EngineError::Aggregate("no update of this round could be fetched".into()));
            }
            let pairs: Vec<(PeerId, Digest)> = updates.iter().map(|(p, u)| (*p, u.manifest.adapter_hash)).collect();
            let digest = inputs::inputs_digest(&pairs);
            // A node that came late, or saw other updates than most, takes
            // the inputs its peers already averaged before it fetches any.
            if let Some(adopted) = self.adopt_inputs(round, digest, &updates, &mut adoption).await? {
                updates = adopted;
                continue;
            }
            let (layout, owners, standby) = self.slice_owners(round, &updates)?;
            // Whose claims settle each slice: its owners, and its standby
            // once it took over.
            let mut group: Vec<Vec<PeerId>> = owners.clone();
            let (layout, owners) = (Arc::new(layout), Arc::new(owners));
            let sources: Arc<Vec<InputSource>> = Arc::new(
                updates
                    .iter()
                    .map(|(author, u)| InputSource {
                        author: *author,
                        examples: u.manifest.examples,
                        adapter: u.manifest.adapter_hash,
                        root: u.manifest.chunk_root.unwrap_or_else(|| merkle::root(&u.manifest.chunk_ids)),
                        count: u.manifest.chunk_count(),
                        chunk_size: u.manifest.chunk_size as usize,
                        own: if *author == me { self.own_update.clone() } else { None },
                    })
                    .collect(),
            );
            let compute = {
                let (net, method, layout, previous, sources, owners) = (self.net.clone(), self.settings.method, layout.clone(), previous.clone(), sources.clone(), owners.clone());
                move |slices: Vec<usize>| compute_slices(net.clone(), layout.clone(), method, previous.clone(), sources.clone(), owners.clone(), slices)
            };
            let view = RoundView { round, digest, layout: &layout, sources: &sources };
            let mut resolved: Vec<Option<Vec<u8>>> = vec![None; layout.count()];
            let mut unavailable: BTreeSet<PeerId> = BTreeSet::new();
            // 1. The slices this node owns: computed and claimed.
            let mine: Vec<usize> = (0..layout.count()).filter(|s| owners[*s].contains(&me)).collect();
            computed.owned += mine.len();
            if !mine.is_empty() {
                // Served under its hash, for peers that saw other inputs.
                self.net.put_blob(round, inputs::encode_inputs(&pairs)).await.map_err(|e| EngineError::Network(e.to_string()))?;
            }
            // An owned slice whose inputs this node could not fetch (their
            // author left) waits for a co-owner's claim: that owner fetched
            // them, and serves them.
            let mut waiting: BTreeMap<usize, Vec<PeerId>> = BTreeMap::new();
            for (s, missing) in self.settle_slices(compute(mine), &view, &group, &mut resolved).await? {
                match owners[s].len() {
                    1 => unavailable.extend(missing),
                    _ => drop(waiting.insert(s, missing)),
                }
            }
            // 2. The other slices from their owners until the deadline;
            //    contested ones are computed here at once.
            // Bounded by the deadline.
            let mut adopted = None;
            let mut convicted = false;
            while unavailable.is_empty() {
                adopted = self.adopt_inputs(round, digest, &updates, &mut adoption).await?;
                // An input's author was quarantined meanwhile: every node
                // drops it, so the pass runs again without it.
                convicted = updates.keys().any(|author| self.convicted.contains(author));
                if adopted.is_some() || convicted {
                    break;
                }
                for s in 0..layout.count() {
                    if resolved[s].is_none() {
                        resolved[s] = self.agreed_result(round, s, digest, (&group[s], owners[s].len()), &layout);
                    }
                }
                let contested: Vec<usize> = (0..layout.count()).filter(|s| resolved[*s].is_none() && self.contested(round, *s, digest, &group[*s])).collect();
                if !contested.is_empty() {
                    computed.contested += contested.len();
                    for (_, missing) in self.settle_slices(compute(contested), &view, &group, &mut resolved).await? {
                        unavailable.extend(missing);
                    }
                }
                let retry: Vec<usize> = waiting.keys().copied().filter(|s| self.claimed_by_others(round, digest, *s, &owners[*s])).collect();
                if !retry.is_empty() {
                    computed.retried += retry.len();
                    waiting.retain(|s, _| !retry.contains(s));
                    for (_, missing) in self.settle_slices(compute(retry), &view, &group, &mut resolved).await? {
                        unavailable.extend(missing);
                    }
                }
                if deadline_passed && !took_over && standby.iter().any(Option::is_some) {
                    // Owners missing or slow: one more node per slice does
                    // their work, where every node computing it would load
                    // every member with requests for the same pieces.
                    took_over = true;
                    let mut mine = Vec::new();
                    for s in (0..layout.count()).filter(|s| resolved[*s].is_none()) {
                        if let Some(next) = standby[s] {
                            group[s].push(next);
                            if next == me {
                                mine.push(s);
                            }
                        }
                    }
                    computed.taken_over += mine.len();
                    for (_, missing) in self.settle_slices(compute(mine), &view, &group, &mut resolved).await? {
                        unavailable.extend(missing);
                    }
                    deadline = self.settings.clock.clone().owned_deadline(round);
                    deadline_passed = false;
                    continue;
                }
                if deadline_passed || resolved.iter().all(Option::is_some) {
                    break;
                }
                // Peers that went two rounds on forget this round's blobs
                // soon: what this node still waits for may never come.
                if let Some((round, adapter)) = self.rejoin_if_overtaken(round, updates.len(), &mut rejoin_tried).await? {
                    return Ok(Reduced::Rejoin { round, adapter });
                }
                tokio::select! {
                    _ = &mut deadline => deadline_passed = true,
                    event = self.events.recv() => match event {
                        Some(event) => self.on_network_event(event, Some(round)),
                        None => return Err(EngineError::Network("the network task stopped".into())),
                    },
                }
            }
            if let Some(adopted) = adopted {
                updates = adopted;
                continue;
            }
            if convicted {
                continue;
            }
            // This node's own slices: a co-owner that claimed otherwise lied.
            for s in (0..layout.count()).filter(|s| group[*s].contains(&me)) {
                if let Some(chunk) = resolved[s].clone() {
                    self.expose_liars(round, s, digest, &group[s], &chunk);
                }
            }
            // 3. What no owner gave by the deadline, and one audited slice
            //    (or part of one: a part that differs from the owners'
            //    result sends this node to compute the whole slice).
            let mut todo: Vec<usize> = (0..layout.count()).filter(|s| resolved[*s].is_none()).collect();
            computed.late += todo.len();
            match self.audit_pick(round, pass, &layout, &owners, &todo) {
                Some((s, None)) => {
                    computed.audited += 1;
                    todo.push(s);
                }
                Some((s, Some(part))) => {
                    let agreed = resolved[s].clone().unwrap_or_default();
                    if !self.audit_part(&view, s, part, &agreed, &previous, &owners[s]).await? {
                        computed.audited += 1;
                        todo.push(s);
                    }
                }
                None => {}
            }
            if unavailable.is_empty() && !todo.is_empty() {
                for (_, missing) in self.settle_slices(compute(todo), &view, &group, &mut resolved).await? {
                    unavailable.extend(missing);
                }
            }
            if !unavailable.is_empty() {
                tracing::warn!(round, pass, dropped = unavailable.len(), "updates no peer could serve are left out; the exchange runs again");
                adoption.unavailable.extend(unavailable.iter().copied());
                updates.retain(|author, _| !unavailable.contains(author));
                continue;
            }
            if let Some(s) = resolved.iter().position(Option::is_none) {
                return Err(EngineError::Aggregate(format!("slice {s} of round {round} could not be computed")));
            }
            let bytes: Vec<u8> = resolved.into_iter().flatten().flatten().collect();
            let average = decode_checked(&bytes, &self.layout, &self.settings.limits).map_err(|e| EngineError::Aggregate(format!("the assembled average: {e}")))?;
            tracing::debug!(
                round,
                passes = pass + 1,
                slices = layout.count(),
                owned = computed.owned,
                contested = computed.contested,
                retried = computed.retried,
                taken_over = computed.taken_over,
                late = computed.late,
                audited = computed.audited,
                adopted = adoption.adopted,
                "slices computed here"
            );
            return Ok(Reduced::Average { average, bytes, inputs: pairs, computed: computed.total() });
        }
        Err(EngineError::Aggregate(format!("the reduce exchange of round {round} did not settle in {REDUCE_PASSES} passes")))
    }

    /// The slices the authors of `updates` cut them into, if they agree
    /// (they do when they saw the same members; else one per input), each
    /// slice's owners in `round`, and its standby: the next author on the
    /// ring, if there is one that is not an owner.
    fn slice_owners(&self, round: u64, updates: &BTreeMap<PeerId, Update>) -> Result<(SliceLayout, Vec<Vec<PeerId>>, Standbys), EngineError> {
        let sizes: BTreeSet<u32> = updates.values().map(|u| u.manifest.chunk_size).collect();
        let layout = match sizes.iter().next() {
            Some(size) if sizes.len() == 1 => SliceLayout::with_chunk_size(&self.layout, *size as usize),
            _ => SliceLayout::new(&self.layout, reduce::slice_count(updates.len())),
        }
        .map_err(EngineError::Aggregate)?;
        let authors: Vec<PeerId> = updates.keys().copied().collect();
        let replicas = self.settings.replicas;
        let mut owners = reduce::owners(&self.settings.run_id, round, &authors, layout.count(), replicas + 1);
        let standby = owners.iter_mut().map(|ranked| if ranked.len() > replicas { ranked.pop() } else { None }).collect();
        Ok((layout, owners, standby))
    }

    /// The inputs more of this round's owners averaged than averaged
    /// `mine`, if this node holds the signed manifest of every one of them:
    /// a node that came late, or missed or got an update the others did
    /// not, ends on their average instead of computing its own. The list
    /// is fetched from its claimants under its hash; a claimant counts only
    /// if it owns, under that list, the slice it claimed (so a peer cannot
    /// make up a list and claim it under many names). A list with authors
    /// whose manifests are not here yet asks peers for the round's
    /// manifests and is tried again as they come.
    async fn adopt_inputs(
        &mut self,
        round: u64,
        mine: Digest,
        updates: &BTreeMap<PeerId, Update>,
        adoption: &mut Adoption,
    ) -> Result<Option<BTreeMap<PeerId, Update>>, EngineError> {
        if adoption.adopted >= MAX_ADOPTIONS {
            return Ok(None);
        }
        // Claimants by inputs digest (this node backs its own inputs).
        let mut claimants: BTreeMap<Digest, BTreeMap<PeerId, BTreeSet<u32>>> = BTreeMap::new();
        let lowest = (round, Digest([0; 32]), 0);
        let highest = (round, Digest([0xff; 32]), u32::MAX);
        for ((_, inputs, slice), claims) in self.claims.range(lowest..=highest) {
            for owner in claims.keys() {
                claimants.entry(*inputs).or_default().entry(*owner).or_default().insert(*slice);
            }
        }
        // At least two claimants: one alone never moves a node.
        let backing = (claimants.get(&mine).map_or(0, BTreeMap::len) + usize::from(updates.contains_key(&self.me()))).max(1);
        let Some((target, claims)) = claimants
            .into_iter()
            .filter(|(inputs, claims)| *inputs != mine && claims.len() > backing && !adoption.refused.contains(inputs))
            .max_by_key(|(inputs, claims)| (claims.len(), *inputs))
        else {
            return Ok(None);
        };
        let list = match adoption.lists.get(&target) {
            Some(list) => list.clone(),
            None => {
                let tries = adoption.fetches.entry(target).or_default();
                *tries += 1;
                if *tries > MAX_LIST_FETCHES {
                    adoption.refused.insert(target);
                    return Ok(None);
                }
                let (net, from) = (self.net.clone(), claims.keys().copied().collect());
                let fetch = async move { net.fetch_chunk(target, from).await };
                let fetched = self.while_listening(fetch, Some(round)).await?;
                match fetched.ok().flatten().map(|bytes| inputs::decode_inputs(&bytes)) {
                    Some(Ok(list)) => {
                        adoption.lists.insert(target, list.clone());
                        list
                    }
                    Some(Err(reason)) => {
                        tracing::warn!(round, %reason, "a claimed input list is malformed");
                        adoption.refused.insert(target);
                        return Ok(None);
                    }
                    // No claimant served it yet: tried again on the next event.
                    None => return Ok(None),
                }
            }
        };
        if list.iter().any(|(author, _)| adoption.unavailable.contains(author)) {
            adoption.refused.insert(target);
            return Ok(None);
        }
        let mut adopted = BTreeMap::new();
        for (author, hash) in &list {
            let held = updates.get(author).or_else(|| self.buffered.get(&round).and_then(|b| b.get(author)));
            match held {
                Some(update) if update.manifest.adapter_hash == *hash => {
                    adopted.insert(*author, update.clone());
                }
                Some(_) => {
                    // Another update than the one its author signed to this
                    // node: the list is not one this node can check.
                    adoption.refused.insert(target);
                    return Ok(None);
                }
                None if !self.excluded.contains_key(author) => {
                    if adoption.asked.insert(target) {
                        self.ask_round(round, updates.keys().copied()).await?;
                    }
                    return Ok(None);
                }
                None => {
                    adoption.refused.insert(target);
                    return Ok(None);
                }
            }
        }
        // A standby that took a slice over claims it too.
        let (_, owners, standby) = self.slice_owners(round, &adopted)?;
        let owns = |owner: &PeerId, s: u32| owners.get(s as usize).is_some_and(|o| o.contains(owner)) || standby.get(s as usize).is_some_and(|b| *b == Some(*owner));
        let owning = claims.iter().filter(|(owner, slices)| slices.iter().all(|s| owns(owner, *s))).count();
        if owning <= backing {
            // Not refused for good: more owners' claims may come.
            return Ok(None);
        }
        tracing::info!(round, inputs = adopted.len(), had = updates.len(), owners = owning, "adopted the inputs most owners averaged");
        adoption.adopted += 1;
        Ok(Some(adopted))
    }

    /// Runs a slice computation while listening, and takes its results: a
    /// computed slice is the truth its owners' claims are checked against,
    /// and this node claims the ones it owns. Returns the slices that could
    /// not be computed, with the authors whose inputs could not be fetched.
    async fn settle_slices(
        &mut self,
        job: impl Future<Output = Vec<(usize, Result<(Vec<u8>, Vec<usize>), Vec<PeerId>>)>>,
        view: &RoundView<'_>,
        owners: &[Vec<PeerId>],
        resolved: &mut [Option<Vec<u8>>],
    ) -> Result<Vec<(usize, Vec<PeerId>)>, EngineError> {
        let me = self.me();
        let mut failed = Vec::new();
        let mut owned = Vec::new();
        let mut results = self.while_listening(job, Some(view.round)).await?;
        results.sort_by_key(|(s, _)| *s);
        for (s, result) in results {
            match result {
                Ok((chunk, bad)) => {
                    self.report_non_finite(view.sources, &bad, s, view.round);
                    if owners[s].contains(&me) {
                        owned.push((s, chunk.clone()));
                    }
                    self.expose_liars(view.round, s, view.digest, &owners[s], &chunk);
                    resolved[s] = Some(chunk);
                }
                Err(missing) => failed.push((s, missing)),
            }
        }
        self.claim_slices(view, owned).await?;
        Ok(failed)
    }

    /// Whether an owner of slice `s` other than this node claimed it over `digest`.
    fn claimed_by_others(&self, round: u64, digest: Digest, s: usize, owners: &[PeerId]) -> bool {
        self.claims.get(&(round, digest, s as u32)).is_some_and(|claims| claims.keys().any(|c| owners.contains(c)))
    }

    /// Slice `s`'s result if at least `quorum` of `group` (its owners, and
    /// its standby once it took over) claimed it over `digest`, none of them
    /// claimed another, and its chunk is here.
    fn agreed_result(&self, round: u64, s: usize, digest: Digest, (group, quorum): (&[PeerId], usize), layout: &SliceLayout) -> Option<Vec<u8>> {
        let claims = self.claims.get(&(round, digest, s as u32))?;
        let present: Vec<&ClaimSeen> = group.iter().filter_map(|o| claims.get(o)).collect();
        let first = present.first()?;
        if present.len() < quorum.max(1) || !present.iter().all(|c| c.result == first.result && c.chunk_size as usize == layout.chunk_size) {
            return None;
        }
        self.slice_results.get(&first.result).map(|(_, bytes)| bytes.clone()).filter(|b| b.len() == layout.range(s).len())
    }

    /// Whether slice `s`'s owners made claims over `digest` that differ.
    fn contested(&self, round: u64, s: usize, digest: Digest, owners: &[PeerId]) -> bool {
        let Some(claims) = self.claims.get(&(round, digest, s as u32)) else { return false };
        let results: BTreeSet<Digest> = owners.iter().filter_map(|o| claims.get(o)).map(|c| c.result).collect();
        results.len() > 1
    }

    /// What this node audits in `round`, if anything: a slice it neither
    /// owns nor computes anyway, and the part of it to check
    /// (`reduce::audit_part`; `None`: the whole slice), picked by hashing
    /// (its key, round, pass), so owners cannot know who checks them. A
    /// node checks `audit` of a slice's values a round on average: a whole
    /// slice with probability `audit`, a part of a share f of the slice
    /// with probability `audit / f` (at most 1), so a wrong value is as
    /// likely to be checked either way, and a node's traffic no longer
    /// jumps by an adapter in the rounds it audits.
    fn audit_pick(&self, round: u64, pass: usize, layout: &SliceLayout, owners: &[Vec<PeerId>], todo: &[usize]) -> Option<(usize, Option<Range<usize>>)> {
        let me = self.me();
        let candidates: Vec<usize> = (0..layout.count()).filter(|s| !owners[*s].contains(&me) && !todo.contains(s)).collect();
        let mut key = me.to_bytes();
        key.extend_from_slice(&round.to_le_bytes());
        key.extend_from_slice(&(pass as u64).to_le_bytes());
        let hash = Digest::of(&key).0;
        let word = |at: usize| u64::from_le_bytes(hash[at..at + 8].try_into().unwrap_or_default());
        let (roll, pick) = (word(0), word(8));
        let s = *candidates.get((roll % candidates.len().max(1) as u64) as usize)?;
        let part = reduce::audit_part(layout, s, self.settings.method, pick);
        let share = part.as_ref().map_or(1.0, |p| p.len() as f64 / layout.value_range(s).len() as f64);
        let chance = (word(16) >> 11) as f64 / (1u64 << 53) as f64;
        (chance < self.settings.audit / share).then_some((s, part))
    }

    /// Checks part `part` of slice `s`'s agreed result `agreed` against
    /// that part computed here from the same part of every input (fetched
    /// alone, with proofs, from its author or the slice's owners): true if
    /// they match, or if some input's part could not be fetched (the audit
    /// is void then; the round does not wait on it).
    async fn audit_part(&mut self, view: &RoundView<'_>, s: usize, part: Range<usize>, agreed: &[u8], previous: &[u8], owners: &[PeerId]) -> Result<bool, EngineError> {
        let me = self.me();
        let helpers: Vec<PeerId> = owners.iter().copied().filter(|o| *o != me).collect();
        let net = self.net.clone();
        let reads = view.sources.iter().map(|input| read_range(&net, input, part.clone(), &helpers, Fetch::OnlyRange));
        let read = self.while_listening(futures::future::join_all(reads), Some(view.round)).await?;
        let Some(inputs) = view
            .sources
            .iter()
            .zip(read)
            .map(|(input, bytes)| {
                Some(SliceInput {
                    author: input.author.to_bytes(),
                    examples: input.examples,
                    bytes: bytes?,
                })
            })
            .collect::<Option<Vec<_>>>()
        else {
            tracing::debug!(round = view.round, slice = s, "an audited part could not be fetched whole; the audit is void");
            return Ok(true);
        };
        let start = view.layout.range(s).start;
        let computed = previous
            .get(part.clone())
            .ok_or_else(|| "the previous average does not cover the audited part".to_owned())
            .and_then(|previous| reduce::compute_part(view.layout, self.settings.method, &part, previous, &inputs));
        match computed {
            Ok(bytes) => Ok(agreed.get(part.start - start..part.end - start) == Some(bytes.as_slice())),
            Err(e) => {
                tracing::warn!(round = view.round, slice = s, error = %e, "an audited part could not be computed");
                Ok(true)
            }
        }
    }

    /// Excludes every owner of slice `s` whose claim over `digest` is not
    /// `chunk`, the slice computed here from the signed inputs.
    fn expose_liars(&mut self, round: u64, s: usize, digest: Digest, owners: &[PeerId], chunk: &[u8]) {
        let truth = Digest::of(chunk);
        let Some(claims) = self.claims.get(&(round, digest, s as u32)) else { return };
        let liars: Vec<(PeerId, Digest)> = owners.iter().filter_map(|o| claims.get(o).filter(|c| c.result != truth).map(|c| (*o, c.result))).collect();
        for (liar, claimed) in liars {
            let reason = format!("lying-reducer: claimed slice {s} of round {round} is {claimed}, the signed inputs give {truth}");
            self.report(EngineEvent::Rejected { peer: liar, reason: reason.clone() });
            self.quarantine(liar, reason, Conviction::Local);
        }
    }

    /// Excludes a peer proven to misbehave (its signed word is the proof):
    /// not a member, not an owner, its updates and claims dropped, and the
    /// network closes its connections.
    fn quarantine(&mut self, peer: PeerId, reason: String, conviction: Conviction) {
        if peer == self.me() || self.excluded.contains_key(&peer) {
            return;
        }
        if conviction == Conviction::Public {
            self.convicted.insert(peer);
        }
        tracing::warn!(%peer, %reason, "quarantined");
        for updates in self.buffered.values_mut() {
            updates.remove(&peer);
        }
        self.recent_authors.remove(&peer);
        self.net.ban(peer);
        self.excluded.insert(peer, reason.clone());
        self.report(EngineEvent::Quarantined { peer, reason });
    }

    fn report_non_finite(&self, sources: &[InputSource], bad: &[usize], s: usize, round: u64) {
        for input in bad.iter().filter_map(|i| sources.get(*i)) {
            let reason = format!("non-finite values in slice {s} of its round-{round} update (taken as no change)");
            self.report(EngineEvent::Rejected { peer: input.author, reason });
        }
    }

    /// Where peers can dial this node, for its manifests (at most
    /// `MAX_ADDRESSES`; none if the network cannot say).
    async fn addresses(&self) -> Vec<String> {
        let addresses = self.net.reachable_addrs().await.unwrap_or_default();
        addresses.iter().map(ToString::to_string).filter(|a| a.len() <= MAX_ADDRESS_LEN).take(MAX_ADDRESSES).collect()
    }

    /// Gossips this node's one signed claim of the slices it computed
    /// (`results`, by slice, in increasing order). No addresses: owners are
    /// authors, whose update manifests gave theirs.
    async fn claim_slices(&mut self, view: &RoundView<'_>, results: Vec<(usize, Vec<u8>)>) -> Result<(), EngineError> {
        if results.is_empty() || self.settings.misbehaviour == Some(Misbehaviour::LazyReducer) {
            return Ok(());
        }
        let mut indices = Vec::with_capacity(results.len());
        let mut bytes = Vec::new();
        for (s, mut chunk) in results {
            if self.settings.misbehaviour == Some(Misbehaviour::LyingReducer) {
                let values = view.layout.value_range(s);
                let skip = values.start - view.layout.range(s).start;
                for value in chunk[skip..].chunks_exact_mut(4) {
                    let lie = f32::from_le_bytes([value[0], value[1], value[2], value[3]]) * 10.0;
                    value.copy_from_slice(&lie.to_le_bytes());
                }
            }
            indices.push(s as u32);
            bytes.extend(chunk);
        }
        let manifest = Manifest {
            kind: ManifestKind::Slice,
            slice: Some(SliceClaim { indices, inputs: view.digest }),
            ..Manifest::describe_chunked(self.settings.run_id, view.round, &self.me(), &bytes, view.layout.chunk_size)
        };
        let signed = self.sign(&manifest)?;
        match self.net.publish(signed, manifest, bytes).await {
            Err(e @ NetworkError::Store(_)) => Err(EngineError::Network(e.to_string())),
            Err(e) => {
                tracing::warn!(round = view.round, error = %e, "could not gossip a slice claim");
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    /// Runs the rounds until the last one; reports each. Logs carry the
    /// run id, the peer id and the round as fields (`--log-format json`).
    pub async fn run(self) -> Result<(), EngineError> {
        let span = tracing::info_span!("node", run = %self.settings.run_id, peer = %self.net.peer_id);
        tracing::Instrument::instrument(self.run_rounds(), span).await
    }

    async fn run_rounds(mut self) -> Result<(), EngineError> {
        let run_id = self.settings.run_id;
        self.net.subscribe(run_id, self.settings.exchange).await.map_err(|e| EngineError::Network(e.to_string()))?;
        let initial = self.trainer.initial().await.map_err(EngineError::Trainer)?;
        self.layout = initial.clone();
        let (mut round, mut current) = (0, initial);
        if let Some(file) = &self.settings.checkpoint
            && let Some(checkpoint) = file.load(&self.layout, &self.settings.limits)?
        {
            self.trainer.restore_optimizer_state(checkpoint.optimizer).await.map_err(EngineError::Trainer)?;
            (round, current) = (checkpoint.round, checkpoint.adapter);
            tracing::info!(round, "resumed from the checkpoint");
            self.report(EngineEvent::Resumed { round });
        }
        // A resumed node asks too: its peers may have gone on meanwhile.
        if (self.settings.catch_up || round > 0) && round < self.settings.rounds
            && let Some((next, adapter)) = self.catch_up(None).await?
            && next > round
        {
            (round, current) = (next, adapter);
        }
        // Ask peers for the first round's updates gossiped before this node
        // subscribed (a catch-up, or peers that started round 0 first:
        // without them the quorum waits for the deadline).
        let mut rejoined = true;
        let mut first_members = if round == 0 { Some(self.round_zero_members().await?) } else { None };
        while round < self.settings.rounds {
            let members = match first_members.take() {
                Some(members) => members,
                None => self.members(round).await?,
            };
            if rejoined {
                self.ask_round(round, []).await?;
                rejoined = false;
            }
            let report = match tracing::Instrument::instrument(self.round(round, &current, &members), tracing::info_span!("round", round)).await? {
                RoundEnd::Done(report) => report,
                RoundEnd::Rejoin { round: next, adapter } => {
                    self.buffered.retain(|r, _| *r >= next);
                    (round, current, rejoined) = (next, adapter, true);
                    continue;
                }
            };
            current = (*report.average).clone();
            self.checkpoint(round + 1, &current).await?;
            let lagging = self.overtaken(round, members.len());
            self.report(EngineEvent::Round(report));
            round += 1;
            // The network's average of the round just done (when it is not
            // this node's own) is worth taking too: it trains the same round.
            if lagging && let Some((next, adapter)) = self.catch_up(Some(round - 1)).await? {
                // Peers are two rounds ahead (this node was cut off or
                // slow): rejoin from the newest average instead of
                // publishing updates nobody will use.
                (round, current) = (next, adapter);
                rejoined = true;
            }
            self.buffered.retain(|r, _| *r >= round);
        }
        self.await_final_certificate().await?;
        self.report(EngineEvent::Finished);
        Ok(())
    }

    /// After the last round, listens until its average is certified (peers
    /// still averaging attest it; late joiners and seeding relays then take
    /// the run's final average), for `FINAL_CERTIFICATE_WAIT` at most.
    async fn await_final_certificate(&mut self) -> Result<(), EngineError> {
        let last = self.settings.rounds.saturating_sub(1);
        let started = Instant::now();
        // Bounded by the wait.
        while self.certified_round.is_none_or(|r| r < last) && started.elapsed() < FINAL_CERTIFICATE_WAIT {
            self.sleep_listening(Duration::from_millis(100), None).await?;
        }
        Ok(())
    }

    /// Writes the checkpoint of a node about to train `round` from `adapter`
    /// (on a blocking thread: it fsyncs), listening meanwhile.
    async fn checkpoint(&mut self, round: u64, adapter: &Tensors) -> Result<(), EngineError> {
        let Some(file) = self.settings.checkpoint.clone() else { return Ok(()) };
        let optimizer = self.trainer.optimizer_state().await.map_err(EngineError::Trainer)?;
        let checkpoint = file.at(round, adapter.clone(), optimizer);
        let path = file.path().display().to_string();
        let writing = tokio::task::spawn_blocking(move || file.save(&checkpoint));
        match self.while_listening(writing, Some(round)).await? {
            Ok(result) => Ok(result?),
            Err(e) => Err(CheckpointError::Io {
                path,
                message: format!("the writer stopped: {e}"),
            }
            .into()),
        }
    }

    /// The round's members, whose updates the quorum waits for (sorted, with
    /// this node): peers that published an update for the previous round or
    /// this one, and every connected peer of the run. Waiting for connected
    /// peers that have not published yet (a late joiner still catching up, a
    /// node one round behind) keeps all nodes in step: without it such a
    /// node's updates always arrived after its peers had closed the round,
    /// and it stayed one round out of phase, averaging other sets of updates,
    /// for the rest of the run.
    ///
    /// A connected peer that never published and let a deadline pass is left
    /// out until it publishes (`silent`): one that subscribes and never
    /// publishes costs the run one deadline, not one a round.
    async fn members(&self, round: u64) -> Result<Vec<PeerId>, EngineError> {
        let mut members: Vec<PeerId> = self.recent_authors.iter().filter(|(_, r)| r.saturating_add(1) >= round).map(|(p, _)| *p).collect();
        let connected = self.net.run_peers(self.settings.run_id).await.map_err(|e| EngineError::Network(e.to_string()))?;
        members.extend(connected.into_iter().filter(|peer| !self.silent.contains(peer)));
        members.retain(|peer| !self.excluded.contains_key(peer));
        members.push(self.me());
        members.sort();
        members.dedup();
        Ok(members)
    }

    /// Round 0's members, the same list on every node (docs/PROTOCOL.md,
    /// "Round 0"): this node announces itself, waits until `min_members`
    /// members (itself included) have, then one grace period more for
    /// announcements still in flight; the list is everyone who announced.
    /// Round-0 updates name the list their authors trained with: a node
    /// whose peers' list leaves it out (it came after they settled) stays
    /// off its own too, and averages round 0 without training in it.
    async fn round_zero_members(&mut self) -> Result<Vec<PeerId>, EngineError> {
        let run_id = self.settings.run_id;
        let hello = Manifest::hello(run_id, &self.me());
        let signed = self.sign(&hello)?;
        let announce = self.settings.misbehaviour != Some(Misbehaviour::Silent);
        match if announce { self.net.publish(signed, hello, Vec::new()).await } else { Ok(()) } {
            Err(e @ NetworkError::Store(_)) => return Err(EngineError::Network(e.to_string())),
            // No peer yet: they find the announcement by asking (below).
            Err(e) => tracing::debug!(error = %e, "announcement not gossiped"),
            Ok(()) => {}
        }
        let wanted = self.settings.min_members.max(1);
        let mut shown = 0;
        // Like Flower's server, a run waits for its members as long as it
        // takes (the operator stops it); each pass asks connected peers for
        // round 0's announcements and updates, which reach a node that
        // subscribed after they were gossiped.
        loop {
            let known = self.announced.len() + 1;
            if known >= wanted || self.round_zero_under_way() {
                break;
            }
            if known != shown {
                tracing::info!(known, wanted, "waiting for peers");
                self.report(EngineEvent::Waiting { known, wanted });
                shown = known;
            }
            self.ask_round(0, []).await?;
            self.sleep_listening(Duration::from_secs(1), Some(0)).await?;
        }
        let mut clock = self.settings.clock.clone();
        let grace = self.settings.grace;
        self.while_listening(clock.wait(grace), Some(0)).await?;
        let mut asks = 0;
        let (with_me, others, lists) = loop {
            let others: Vec<PeerId> = self.announced.iter().copied().collect();
            let mut with_me = others.clone();
            with_me.push(self.me());
            with_me.sort();
            // Round-0 updates already here say which list their authors
            // trained with: this node is on it, or came too late for it.
            let lists: BTreeSet<Digest> = self.buffered.get(&0).map(|u| u.values().filter_map(|u| u.manifest.members).collect()).unwrap_or_default();
            let known = lists.is_empty() || lists.contains(&members_digest(&with_me)) || lists.contains(&members_digest(&others));
            // Neither: announcements its peers saw are still on their way
            // here (a large network starting at once). Asked for, so that
            // this node trains with its peers' list instead of adopting
            // their inputs later, which costs the round a second pass.
            if known || asks == ROUND_ZERO_ASKS {
                break (with_me, others, lists);
            }
            asks += 1;
            self.ask_round(0, []).await?;
            self.sleep_listening(Duration::from_secs(1), Some(0)).await?;
        };
        let member = lists.contains(&members_digest(&with_me)) || !lists.contains(&members_digest(&others));
        let members = if member { with_me } else { others };
        tracing::info!(count = members.len(), member, "round 0 members settled");
        self.report(EngineEvent::Members { count: members.len(), member });
        Ok(members)
    }

    /// Round 0 is under way if peers already published updates for it.
    fn round_zero_under_way(&self) -> bool {
        self.buffered.get(&0).is_some_and(|updates| updates.keys().any(|author| *author != self.me()))
    }

    /// One round from `current`; the quorum is every one of `members`.
    async fn round(&mut self, round: u64, current: &Tensors, members: &[PeerId]) -> Result<RoundEnd, EngineError> {
        let started = Instant::now();
        let run_id = self.settings.run_id;
        let parent = Digest::of(&encode(current).map_err(EngineError::Aggregate)?);
        let me = self.me();
        let silent = self.settings.misbehaviour == Some(Misbehaviour::Silent);
        let member = members.contains(&me) && !silent;
        let rows = self.rows(members);
        // 1. Train (a node with no rows this round contributes its start
        //    adapter with zero weight; one that is not a member, nothing).
        let (update, local) = if rows.is_empty() || !member {
            (current.clone(), LocalResult::default())
        } else {
            let (trainer, start, picked) = (self.trainer.clone(), current.clone(), rows.clone());
            let training = async move { trainer.train(start, picked, round).await };
            self.while_listening(training, Some(round)).await?.map_err(EngineError::Trainer)?
        };
        // 2. Publish.
        if member {
            let chunk_size = match self.settings.exchange {
                Exchange::Gossip => CHUNK_SIZE,
                Exchange::Reduce => SliceLayout::new(&self.layout, reduce::slice_count(members.len())).map_err(EngineError::Aggregate)?.chunk_size,
            };
            let listed = (round == 0).then(|| members_digest(members));
            self.publish_update(round, parent, update, &local, (chunk_size, listed)).await?;
        }
        // 3. Collect until every member's update is in, or the deadline.
        // A member quarantined meanwhile is not waited for.
        let quorum = |buffered: &BTreeMap<u64, BTreeMap<PeerId, Update>>, excluded: &HashMap<PeerId, String>| {
            let waited = |m: &&PeerId| **m != me || member;
            buffered.get(&round).is_some_and(|got| members.iter().filter(waited).all(|m| got.contains_key(m) || excluded.contains_key(m)))
        };
        self.report(EngineEvent::Collecting { round, deadline: self.settings.clock.wall_deadline(round) });
        let mut deadline = self.settings.clock.clone().owned_deadline(round);
        let mut extensions = 0;
        let mut halfway_clock = self.settings.clock.clone();
        let halfway = halfway_clock.halfway(round);
        tokio::pin!(halfway);
        let mut asked = false;
        let mut timed_out = false;
        // Bounded by the deadline.
        while !quorum(&self.buffered, &self.excluded) {
            tokio::select! {
                _ = &mut deadline => {
                    // Most members alive one round behind (their reduce
                    // ran longer, or they caught up): averaging without
                    // them would leave this node a round ahead, averaging
                    // alone every round after (the churn scenario did so
                    // in 3 runs of 16).
                    if extensions < MAX_DEADLINE_EXTENSIONS && self.ahead_of_members(round, members) {
                        extensions += 1;
                        tracing::info!(round, extensions, "most members are one round behind: waiting one deadline more");
                        deadline = self.settings.clock.clone().owned_deadline(round);
                        continue;
                    }
                    timed_out = true;
                    break;
                }
                // Updates gossip has not brought by half the deadline are
                // asked of peers: churn can leave the gossip mesh in two
                // parts that stay connected yet pass nothing across (the
                // churn soak ended split in two groups, 1 run in 8).
                () = &mut halfway, if !asked => {
                    asked = true;
                    self.ask_round(round, []).await?;
                }
                event = self.events.recv() => match event {
                    Some(event) => self.on_network_event(event, Some(round)),
                    None => return Err(EngineError::Network("the network task stopped".into())),
                },
            }
        }
        if !timed_out {
            let mut grace_clock = self.settings.clock.clone();
            let grace = grace_clock.wait(self.settings.grace);
            let grace_or_deadline = async {
                tokio::select! {
                    _ = &mut deadline => {}
                    _ = grace => {}
                }
            };
            self.while_listening(grace_or_deadline, Some(round)).await?;
        }
        // 4. Average, inputs sorted by author. Round 0's members are settled
        //    (the same list on every node): an update from anyone else would
        //    only split the averages.
        let mut updates = self.buffered.remove(&round).unwrap_or_default();
        if round == 0 {
            updates.retain(|author, _| members.contains(author));
        }
        if timed_out {
            // Only peers this node never had an update from: a peer that has
            // published is waited for as before, because under loss or load
            // an honest node's update can miss one deadline here and not at
            // its other peers, and leaving it out on some nodes only would
            // split the next round's averages (the churn soak showed it).
            let never_published = |m: &&PeerId| !updates.contains_key(*m) && !self.recent_authors.contains_key(*m);
            for missing in members.iter().filter(never_published) {
                tracing::info!(peer = %missing, round, "no update ever, and none by the deadline: not waited for again until it publishes");
                self.silent.insert(*missing);
            }
        }
        let same_parent = updates.values().filter(|u| u.manifest.parent == Some(parent)).count();
        // Each count is 0 or examples_per_round (check_claims), so the sum
        // is bounded by members × that; saturate rather than trust it.
        let examples: u64 = updates.values().fold(0u64, |sum, u| sum.saturating_add(u.manifest.examples));
        let (average, average_bytes, used, fedavg_drift, slices_computed) = match self.settings.exchange {
            Exchange::Gossip => {
                let mut used = Vec::new();
                let inputs: Vec<Contribution> = updates
                    .into_iter()
                    .filter_map(|(author, u)| {
                        let tensors = u.tensors?;
                        used.push((author, u.manifest.adapter_hash));
                        Some(Contribution {
                            author: author.to_bytes(),
                            examples: u.manifest.examples,
                            tensors,
                        })
                    })
                    .collect();
                let fedavg_drift = if self.settings.measure_drift { fedavg_drift(inputs.clone()).ok() } else { None };
                let average = aggregate(self.settings.method, inputs, Some(current)).map_err(|e| EngineError::Aggregate(e.to_string()))?;
                let average_bytes = encode(&average).map_err(EngineError::Aggregate)?;
                (average, average_bytes, used, fedavg_drift, None)
            }
            Exchange::Reduce => match self.reduce_round(round, current, updates).await? {
                Reduced::Average { average, bytes, inputs, computed } => (average, bytes, inputs, None, Some(computed)),
                Reduced::Rejoin { round, adapter } => return Ok(RoundEnd::Rejoin { round, adapter }),
            },
        };
        self.claims.retain(|(r, _, _), _| *r > round);
        self.slice_results.retain(|_, (r, _)| *r > round);
        let average_hash = Digest::of(&average_bytes);
        let eval_loss = if self.settings.evaluate {
            let (trainer, adapter) = (self.trainer.clone(), average.clone());
            let evaluation = async move { trainer.evaluate(adapter).await };
            Some(self.while_listening(evaluation, Some(round + 1)).await?.map_err(EngineError::Trainer)?)
        } else {
            None
        };
        // Kept and served to late joiners inside its certificate, never
        // gossiped: nodes that agree already hold these chunks. The
        // attestation is gossiped (docs/SECURITY.md, "Round certificates").
        let count = used.len();
        let inputs_list = inputs::encode_inputs(&used);
        let average_manifest = Manifest {
            kind: ManifestKind::Average,
            parent: Some(parent),
            examples,
            eval_loss,
            inputs: Some(Digest::of(&inputs_list)),
            ..Manifest::describe(run_id, round, &me, &average_bytes)
        };
        let kept = match self.settings.misbehaviour {
            Some(Misbehaviour::FakeAverage) => self.fake_average(round, &average)?,
            _ => self.attested(average_manifest, average_bytes, inputs_list)?,
        };
        if !silent {
            self.net.keep_average(kept).await.map_err(|e| EngineError::Network(e.to_string()))?;
        }
        if let Err(e) = self.net.forget_before(round.saturating_sub(1)).await {
            tracing::warn!(error = %e, "store clean-up failed");
        }
        if let Some(dir) = &self.settings.save_dir
            && self.settings.save_every > 0
            && ((round + 1) % u64::from(self.settings.save_every) == 0 || round + 1 == self.settings.rounds)
        {
            let (trainer, adapter, dir) = (self.trainer.clone(), average.clone(), dir.join(format!("round-{round:04}")));
            let saving = async move { trainer.save(adapter, dir).await };
            if let Err(e) = self.while_listening(saving, Some(round + 1)).await? {
                tracing::error!(round, error = %e, "could not save the averaged adapter");
            }
        }
        tracing::debug!(round, contributors = count, expected = members.len(), timed_out, average = %average_hash, "round done");
        let report = RoundReport {
            round,
            average_hash,
            average: Arc::new(average),
            parent,
            contributors: count,
            expected: members.len(),
            timed_out,
            rows: rows.len(),
            local,
            eval_loss,
            agreement_before: same_parent as f64 / count.max(1) as f64,
            fedavg_drift,
            elapsed: started.elapsed(),
            members: self.member_views(members, round),
            slices_computed,
        };
        Ok(RoundEnd::Done(report))
    }

    /// Whether most of the round's other members are one round behind:
    /// each signed round r−1 and has not sent its update of round r. That
    /// is most members' own word, so one peer cannot hold a round up.
    fn ahead_of_members(&self, round: u64, members: &[PeerId]) -> bool {
        let me = self.me();
        let got = self.buffered.get(&round);
        let others: Vec<PeerId> = members.iter().copied().filter(|peer| *peer != me && !self.excluded.contains_key(peer)).collect();
        most_one_round_behind(round, &others, |peer| got.is_some_and(|updates| updates.contains_key(peer)), |peer| self.recent_authors.get(peer).copied())
    }

    /// Once a round (`tried`): if this node is overtaken, the round to
    /// train next and the newest average to train it from.
    async fn rejoin_if_overtaken(&mut self, round: u64, members: usize, tried: &mut bool) -> Result<Option<(u64, Tensors)>, EngineError> {
        if *tried || !self.overtaken(round, members) {
            return Ok(None);
        }
        *tried = true;
        self.catch_up(Some(round)).await
    }

    /// Most of the round's other members published updates two rounds or
    /// more after `round` (a majority, so that one peer's claim to be ahead
    /// moves nobody): this node was cut off or slow, and rejoins from their
    /// newest average instead of finishing a round they left behind.
    /// The newest round each author signed counts, not only the updates
    /// buffered: an update too far ahead of this node's round is not kept
    /// (a partitioned node's peers may be three rounds on), yet it is what
    /// shows that this node fell behind.
    fn overtaken(&self, round: u64, members: usize) -> bool {
        let ahead = self.recent_authors.values().filter(|newest| **newest >= round.saturating_add(2)).count();
        let others = members.saturating_sub(1).max(1);
        ahead.saturating_mul(2) >= others
    }
}

/// How a quarantine's proof travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Conviction {
    /// Every node gets it: gossiped evidence, or a signed manifest gossiped
    /// to all.
    Public,
    /// Only this node proved it (a slice claim it recomputed).
    Local,
}

/// How a round ended.
enum RoundEnd {
    Done(RoundReport),
    /// Peers went on meanwhile: train `round` next, from `adapter`.
    Rejoin { round: u64, adapter: Tensors },
}

/// What the reduce exchange of a round gave.
enum Reduced {
    /// The average, its encoding, the (author, update hash) pairs it
    /// averaged, and how many slices this node computed.
    Average { average: Tensors, bytes: Vec<u8>, inputs: Vec<(PeerId, Digest)>, computed: usize },
    Rejoin { round: u64, adapter: Tensors },
}

/// Agreement across nodes: the share of `hashes` equal to the most common one.
pub fn agreement(hashes: &[Digest]) -> f64 {
    let mut counts: HashMap<&Digest, usize> = HashMap::new();
    for hash in hashes {
        *counts.entry(hash).or_default() += 1;
    }
    counts.values().max().copied().unwrap_or(0) as f64 / hashes.len().max(1) as f64
}

/// Slices `slices` of the average: each input's needed bytes fetched from
/// its author, or else from the slice's other owners, which fetched the
/// same chunks (its own bytes for this node's update), then averaged. A
/// slice whose inputs could not all be fetched gives the authors that
/// failed.
async fn compute_slices(
    net: NetworkHandle,
    layout: Arc<SliceLayout>,
    method: Method,
    previous: Arc<Vec<u8>>,
    sources: Arc<Vec<InputSource>>,
    owners: Arc<Vec<Vec<PeerId>>>,
    slices: Vec<usize>,
) -> Vec<(usize, Result<(Vec<u8>, Vec<usize>), Vec<PeerId>>)> {
    let jobs = slices.into_iter().map(|s| {
        let (net, layout, previous, sources) = (net.clone(), layout.clone(), previous.clone(), sources.clone());
        let helpers: Vec<PeerId> = owners.get(s).cloned().unwrap_or_default().into_iter().filter(|o| *o != net.peer_id).collect();
        async move {
            let needed = reduce::needed(&layout, s, method);
            let reads = sources.iter().map(|input| read_range(&net, input, needed.clone(), &helpers, Fetch::WholeChunks));
            let read = futures::future::join_all(reads).await;
            let failed: Vec<PeerId> = sources.iter().zip(&read).filter(|(_, r)| r.is_none()).map(|(i, _)| i.author).collect();
            if !failed.is_empty() {
                return (s, Err(failed));
            }
            let inputs: Vec<SliceInput> = sources
                .iter()
                .zip(read)
                .map(|(input, bytes)| SliceInput {
                    author: input.author.to_bytes(),
                    examples: input.examples,
                    bytes: bytes.unwrap_or_default(),
                })
                .collect();
            match reduce::compute_slice(&layout, s, method, &previous, &inputs) {
                Ok(result) => (s, Ok(result)),
                Err(e) => {
                    tracing::warn!(slice = s, error = %e, "a slice could not be computed");
                    (s, Err(Vec::new()))
                }
            }
        }
    });
    futures::future::join_all(jobs).await
}

/// How `read_range` fetches the chunks that cover a range.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fetch {
    /// Whole chunks, kept to serve on (what owners compute from).
    WholeChunks,
    /// Only the range's bytes of each chunk, with a bao proof (an audit of
    /// part of a slice).
    OnlyRange,
}

/// The bytes `range` of an input: the chunks that cover it (or their
/// bytes in it), fetched from the author or else from `helpers` (each
/// checked against its id), or its own bytes.
async fn read_range(net: &NetworkHandle, input: &InputSource, range: Range<usize>, helpers: &[PeerId], fetch: Fetch) -> Option<Vec<u8>> {
    if let Some(own) = &input.own {
        return own.get(range).map(<[u8]>::to_vec);
    }
    if range.is_empty() {
        return Some(Vec::new());
    }
    let first = range.start / input.chunk_size;
    let last = (range.end - 1) / input.chunk_size;
    if last >= input.count {
        return None;
    }
    let mut peers = vec![input.author];
    peers.extend(helpers.iter().filter(|h| **h != input.author));
    let mut pieces = Vec::with_capacity(last + 1 - first);
    for index in first..=last {
        let chunk = index * input.chunk_size..(index + 1) * input.chunk_size;
        let within = range.start.max(chunk.start) - chunk.start..range.end.min(chunk.end) - chunk.start;
        let part = match fetch {
            Fetch::WholeChunks => None,
            Fetch::OnlyRange => Some((u32::try_from(within.start).ok()?, u32::try_from(within.len()).ok()?)),
        };
        pieces.push(Piece {
            adapter: input.adapter,
            index: u32::try_from(index).ok()?,
            root: input.root,
            count: input.count,
            part,
        });
    }
    let fetches = pieces.into_iter().map(|piece| net.fetch_piece(piece, peers.clone()));
    let mut bytes = Vec::with_capacity((last + 1 - first) * input.chunk_size);
    for chunk in futures::future::join_all(fetches).await {
        bytes.extend(chunk.ok()??);
    }
    if fetch == Fetch::OnlyRange {
        return (bytes.len() == range.len()).then_some(bytes);
    }
    let start = range.start - first * input.chunk_size;
    bytes.get(start..start + range.len()).map(<[u8]>::to_vec)
}

/// Whether most of `others` are one round behind `round`: no update of
/// `round` from them is held, and the newest round each signed is the one
/// before.
fn most_one_round_behind(round: u64, others: &[PeerId], holds: impl Fn(&PeerId) -> bool, newest: impl Fn(&PeerId) -> Option<u64>) -> bool {
    let behind = others.iter().filter(|peer| !holds(peer) && newest(peer).is_some_and(|signed| signed.saturating_add(1) == round)).count();
    behind.saturating_mul(2) > others.len()
}

/// Bounded memory whatever peers claim: at most `LOOKAHEAD + 1` rounds of
/// updates. A node catching up (`from` unknown) keeps the newest rounds; one
/// in a round keeps that round (its own update is there) and drops the
/// farthest ahead, which a catch-up may have taken in beyond its window
/// (dropping the oldest lost a node's own update after a catch-up found no
/// average: the node then left itself out of its round).
fn bound_rounds<V>(buffered: &mut BTreeMap<u64, V>, from: Option<u64>) {
    while buffered.len() > LOOKAHEAD as usize + 1 {
        match from {
            Some(_) => buffered.pop_last(),
            None => buffered.pop_first(),
        };
    }
}

/// Whether `round` lies in the window `from..=from+LOOKAHEAD` of a node in
/// round `from` (never while catching up, when `from` is unknown).
fn in_window(round: u64, from: Option<u64>) -> bool {
    from.is_some_and(|r| round >= r && round <= r.saturating_add(LOOKAHEAD))
}

/// blake3 of a sorted member list (round-0 updates carry it).
fn members_digest(members: &[PeerId]) -> Digest {
    let mut bytes = Vec::new();
    for member in members {
        inputs::push_peer(&mut bytes, &member.to_bytes());
    }
    Digest::of(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_waits_only_for_a_majority_one_round_behind() {
        let others: Vec<PeerId> = (0..4).map(|_| PeerId::random()).collect();
        let others_index = |peer: &PeerId| others.iter().position(|p| p == peer);
        // The newest round each of the four signed.
        let signed = |rounds: [u64; 4]| move |peer: &PeerId| others_index(peer).map(|i| rounds[i]);
        let none_held = |_: &PeerId| false;
        // All four signed round 2 and nothing of round 3: wait.
        assert!(most_one_round_behind(3, &others, none_held, signed([2, 2, 2, 2])));
        // Three of four behind is most; two of four is not.
        assert!(most_one_round_behind(3, &others, none_held, signed([2, 2, 2, 3])));
        assert!(!most_one_round_behind(3, &others, none_held, signed([2, 2, 3, 3])));
        // One peer alone cannot hold a round up.
        assert!(!most_one_round_behind(3, &others, none_held, signed([2, 3, 3, 3])));
        // Peers whose updates of round 3 are here are not behind.
        let held = |peer: &PeerId| others_index(peer).is_some_and(|i| i < 2);
        assert!(!most_one_round_behind(3, &others, held, signed([2, 2, 2, 2])));
        // Peers last heard of two rounds back (gone) are not waited for,
        // nor are peers never heard of.
        assert!(!most_one_round_behind(3, &others, none_held, signed([1, 1, 1, 2])));
        assert!(!most_one_round_behind(3, &others, none_held, |_: &PeerId| None));
        // A node alone waits for nobody.
        assert!(!most_one_round_behind(3, &[], none_held, |_: &PeerId| Some(2)));
    }

    #[test]
    fn a_node_in_a_round_keeps_it_when_updates_from_far_ahead_are_held() {
        // A catch-up took in rounds 4 to 6; the node then published in round 3.
        let mut buffered: BTreeMap<u64, &str> = (3..=6).map(|r| (r, "updates")).collect();
        bound_rounds(&mut buffered, Some(3));
        assert_eq!(buffered.keys().copied().collect::<Vec<_>>(), vec![3, 4, 5]);
        // Catching up, the newest rounds are what counts.
        let mut buffered: BTreeMap<u64, &str> = (3..=6).map(|r| (r, "updates")).collect();
        bound_rounds(&mut buffered, None);
        assert_eq!(buffered.keys().copied().collect::<Vec<_>>(), vec![4, 5, 6]);
    }
}
