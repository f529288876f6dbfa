//! The round engine (docs/PROTOCOL.md, "A round"): train → publish → collect →
//! average → next round. It sees the trainer only through [`RoundTrainer`]
//! and the network only through its handle and events; docs/PROTOCOL.md
//! explains the choices.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use libp2p::PeerId;
use libp2p_identity::Keypair;
use tokio::sync::{mpsc, watch};

use crate::aggregate::{Contribution, Method, Tensors, aggregate, fedavg_drift};
use crate::p2p::network::{NetworkError, NetworkEvent, NetworkHandle};
use crate::wire::codec::{Digest, Limits};
use crate::wire::manifest::{Manifest, ManifestKind, SignedManifest};
use crate::wire::tensors::{decode_checked, encode};

use super::checkpoint::{CheckpointError, CheckpointFile};
use super::partition::{hash_partition, hash_partition_sizes, static_partition};

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
        match self {
            RoundClock::Wall { timeout } => tokio::time::sleep(*timeout).await,
            RoundClock::Schedule { .. } => {
                let left = self.wall_deadline(round).and_then(|end| end.duration_since(SystemTime::now()).ok()).unwrap_or_default();
                tokio::time::sleep(left).await;
            }
            RoundClock::ComputeIdle { timeout, .. } => {
                let timeout = *timeout;
                self.wait(timeout).await
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
    /// Before round 0, wait (up to ten seconds) for this many peers.
    pub min_peers: usize,
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
    Round(RoundReport),
    Rejected { peer: PeerId, reason: String },
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

/// A peer's update for some round.
struct Update {
    manifest: Manifest,
    tensors: Tensors,
}

/// The newest verified average seen while catching up.
struct Candidate {
    round: u64,
    hash: Digest,
    tensors: Tensors,
}

/// How many rounds ahead of this node updates are kept.
const LOOKAHEAD: u64 = 2;

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
    /// The layout every adapter must have (the node's own initial adapter).
    layout: Tensors,
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
            layout: Tensors::new(),
        }
    }

    fn me(&self) -> PeerId {
        self.net.peer_id
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
            NetworkEvent::AdapterReady { manifest, author, bytes } => (manifest, author, bytes),
            NetworkEvent::Rejected { peer, reason } => return self.report(EngineEvent::Rejected { peer, reason }),
            NetworkEvent::Listening(addr) => return self.report(EngineEvent::Listening(addr)),
            NetworkEvent::PeerConnected(peer) => return self.report(EngineEvent::PeerConnected(peer)),
            NetworkEvent::DialFailed { peer, error } => return tracing::debug!(?peer, %error, "a dial failed"),
            NetworkEvent::Manifest { .. } => return,
        };
        if manifest.run_id != self.settings.run_id || author == self.me() {
            return;
        }
        if let Err(reason) = self.check_claims(&manifest) {
            tracing::warn!(peer = %author, round = manifest.round, %reason, "rejected an adapter");
            return self.report(EngineEvent::Rejected { peer: author, reason });
        }
        let tensors = match decode_checked(&bytes, &self.layout, &self.settings.limits) {
            Ok(t) => t,
            Err(reason) => {
                tracing::warn!(peer = %author, round = manifest.round, %reason, "rejected an adapter");
                return self.report(EngineEvent::Rejected { peer: author, reason });
            }
        };
        if manifest.kind == ManifestKind::Average {
            if from.is_none() && self.candidate.as_ref().is_none_or(|c| manifest.round > c.round) {
                self.candidate = Some(Candidate {
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
        // Bounded memory whatever peers claim: the newest rounds win.
        while self.buffered.len() > LOOKAHEAD as usize + 1 {
            self.buffered.pop_first();
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
    /// not finished a round yet).
    async fn catch_up(&mut self) -> Result<Option<(u64, Tensors)>, EngineError> {
        self.candidate = None;
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
        // Updates go round but no average came: start from the newest update,
        // in its round (one peer's view, better than none).
        let Some((round, updates)) = self.buffered.pop_last() else { return Ok(None) };
        let Some((author, update)) = updates.into_iter().next() else { return Ok(None) };
        tracing::warn!(round, from = %author, "no average came; starting from a peer's update");
        self.report(EngineEvent::CaughtUp { round, from: update.manifest.adapter_hash });
        Ok(Some((round, update.tensors)))
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

    /// Runs the rounds until the last one; reports each. Logs carry the
    /// run id, the peer id and the round as fields (`--log-format json`).
    pub async fn run(self) -> Result<(), EngineError> {
        let span = tracing::info_span!("node", run = %self.settings.run_id, peer = %self.net.peer_id);
        tracing::Instrument::instrument(self.run_rounds(), span).await
    }

    async fn run_rounds(mut self) -> Result<(), EngineError> {
        let run_id = self.settings.run_id;
        self.net.subscribe(run_id).await.map_err(|e| EngineError::Network(e.to_string()))?;
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
            && let Some((next, adapter)) = self.catch_up().await?
            && next > round
        {
            (round, current) = (next, adapter);
        }
        // Ask peers for the first round's updates gossiped before this node
        // subscribed (a catch-up, or peers that started round 0 first:
        // without them the quorum waits for the deadline).
        let mut rejoined = true;
        if round == 0 {
            self.wait_for_peers().await?;
        }
        while round < self.settings.rounds {
            let members = self.members(round).await?;
            if rejoined {
                self.net.ask_round(run_id, round).await.map_err(|e| EngineError::Network(e.to_string()))?;
                rejoined = false;
            }
            let report = tracing::Instrument::instrument(self.round(round, &current, &members), tracing::info_span!("round", round)).await?;
            current = (*report.average).clone();
            self.checkpoint(round + 1, &current).await?;
            let lagging = self.buffered.keys().next_back().is_some_and(|r| *r >= round.saturating_add(2));
            self.report(EngineEvent::Round(report));
            round += 1;
            if lagging && let Some((next, adapter)) = self.catch_up().await? {
                // Peers are two rounds ahead (this node was cut off or
                // slow): rejoin from the newest average instead of
                // publishing updates nobody will use.
                (round, current) = (next, adapter);
                rejoined = true;
            }
            self.buffered.retain(|r, _| *r >= round);
        }
        self.report(EngineEvent::Finished);
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
        members.push(self.me());
        members.sort();
        members.dedup();
        Ok(members)
    }

    async fn wait_for_peers(&mut self) -> Result<(), EngineError> {
        let wanted = self.settings.min_peers;
        // Bounded: 100 checks, a tenth of a second each.
        for _ in 0..100 {
            let peers = self.net.run_peers(self.settings.run_id).await.map_err(|e| EngineError::Network(e.to_string()))?;
            if peers.len() >= wanted {
                return Ok(());
            }
            self.sleep_listening(Duration::from_millis(100), Some(0)).await?;
        }
        tracing::warn!(wanted, "starting round 0 before every expected peer joined");
        Ok(())
    }

    /// One round from `current`; the quorum is every one of `members`.
    async fn round(&mut self, round: u64, current: &Tensors, members: &[PeerId]) -> Result<RoundReport, EngineError> {
        let started = Instant::now();
        let run_id = self.settings.run_id;
        let parent = Digest::of(&encode(current).map_err(EngineError::Aggregate)?);
        let rows = self.rows(members);
        // 1. Train (a node with no rows this round contributes its start
        //    adapter with zero weight).
        let (update, local) = if rows.is_empty() {
            (current.clone(), LocalResult::default())
        } else {
            let (trainer, start, picked) = (self.trainer.clone(), current.clone(), rows.clone());
            let training = async move { trainer.train(start, picked, round).await };
            self.while_listening(training, Some(round)).await?.map_err(EngineError::Trainer)?
        };
        // 2. Publish.
        let bytes = encode(&update).map_err(EngineError::Aggregate)?;
        let manifest = Manifest {
            parent: Some(parent),
            examples: local.examples,
            tokens: local.tokens,
            train_loss: local.loss,
            ..Manifest::describe(run_id, round, &self.me(), &bytes)
        };
        let signed = self.sign(&manifest)?;
        match self.net.publish(signed, manifest.clone(), bytes).await {
            Ok(()) => {}
            // A node that cannot keep its own update cannot serve it.
            Err(e @ NetworkError::Store(_)) => return Err(EngineError::Network(e.to_string())),
            // No peer in the topic right now: the update stays in the store
            // for fetches, and the round goes on.
            Err(e) => tracing::warn!(round, error = %e, "could not gossip the update"),
        }
        let me = self.me();
        self.buffered.entry(round).or_default().insert(me, Update { manifest, tensors: update });
        // 3. Collect until every member's update is in, or the deadline.
        let quorum = |buffered: &BTreeMap<u64, BTreeMap<PeerId, Update>>| {
            buffered.get(&round).is_some_and(|got| members.iter().all(|m| got.contains_key(m)))
        };
        let mut clock = self.settings.clock.clone();
        self.report(EngineEvent::Collecting { round, deadline: clock.wall_deadline(round) });
        let deadline = clock.deadline(round);
        tokio::pin!(deadline);
        let mut timed_out = false;
        // Bounded by the deadline.
        while !quorum(&self.buffered) {
            tokio::select! {
                _ = &mut deadline => {
                    timed_out = true;
                    break;
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
        // 4. Average, inputs sorted by author.
        let updates = self.buffered.remove(&round).unwrap_or_default();
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
        let inputs: Vec<Contribution> = updates
            .into_iter()
            .map(|(author, u)| Contribution {
                author: author.to_bytes(),
                examples: u.manifest.examples,
                tensors: u.tensors,
            })
            .collect();
        let count = inputs.len();
        let fedavg_drift = if self.settings.measure_drift { fedavg_drift(inputs.clone()).ok() } else { None };
        let average = aggregate(self.settings.method, inputs, Some(current)).map_err(|e| EngineError::Aggregate(e.to_string()))?;
        let average_bytes = encode(&average).map_err(EngineError::Aggregate)?;
        let average_hash = Digest::of(&average_bytes);
        let eval_loss = if self.settings.evaluate {
            let (trainer, adapter) = (self.trainer.clone(), average.clone());
            let evaluation = async move { trainer.evaluate(adapter).await };
            Some(self.while_listening(evaluation, Some(round + 1)).await?.map_err(EngineError::Trainer)?)
        } else {
            None
        };
        // Kept and served to late joiners, not gossiped: nodes that agree
        // already hold these chunks.
        let average_manifest = Manifest {
            kind: ManifestKind::Average,
            parent: Some(parent),
            examples,
            eval_loss,
            ..Manifest::describe(run_id, round, &me, &average_bytes)
        };
        let signed = self.sign(&average_manifest)?;
        self.net.keep(signed, average_manifest, average_bytes).await.map_err(|e| EngineError::Network(e.to_string()))?;
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
        };
        Ok(report)
    }
}

/// Agreement across nodes: the share of `hashes` equal to the most common one.
pub fn agreement(hashes: &[Digest]) -> f64 {
    let mut counts: HashMap<&Digest, usize> = HashMap::new();
    for hash in hashes {
        *counts.entry(hash).or_default() += 1;
    }
    counts.values().max().copied().unwrap_or(0) as f64 / hashes.len().max(1) as f64
}
