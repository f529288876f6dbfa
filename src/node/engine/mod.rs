//! The round engine (docs/PROTOCOL.md, "A round"): train → publish →
//! collect → average → outer step → certify → next round. It sees the trainer only
//! through [`RoundTrainer`] and the network only through its handle and
//! events. `round()` below reads as the protocol's steps; each phase lives
//! in a file of its own:
//!
//! | file | what it does |
//! | --- | --- |
//! | `inbox.rs` | network events in: updates, claims, announcements, certificates, each checked and kept ([`Heard`](inbox::Heard)) |
//! | `members.rs` | round 0's settled member list, later rounds' members, who trains on which rows, who is behind |
//! | `publish.rs` | step 2: this node's update, signed and gossiped |
//! | `feedback.rs` | a compressed update: the round's change and the error feedback's residual |
//! | `collect.rs` | step 3: the members' updates until the quorum or the deadline |
//! | `average.rs` | step 4 in the gossip exchange: every update averaged here |
//! | `reduce.rs` | step 4 in the reduce exchange: owned slices computed and claimed, the others taken from their owners |
//! | `slice_reads.rs` | the slices' inputs fetched point to point, with proofs |
//! | `slices.rs` | the reduce exchange's pure parts: slice owners, what a slice needs, slice averaging |
//! | `claims.rs` | slice owners' claims and the results they claimed ([`ClaimBook`](claims::ClaimBook)) |
//! | `adopt.rs` | the inputs most owners averaged, for a node that saw others |
//! | `audit.rs` | a slice (or part of one) recomputed to check its owners |
//! | `quarantine.rs` | peers proven to misbehave, left out ([`Verdicts`](quarantine::Verdicts)) |
//! | `certify.rs` | step 5: the average kept with its attestation; certificates of it |
//! | `catch_up.rs` | the newest certified average, for a joiner or a node left behind |
//! | `clock.rs`, `settings.rs`, `trainer.rs`, `events.rs` | deadlines, settings, the trainer seam, what the engine reports |

mod adopt;
mod audit;
mod average;
mod catch_up;
mod certify;
mod claims;
mod clock;
mod collect;
mod events;
mod feedback;
mod inbox;
mod members;
mod publish;
mod quarantine;
mod reduce;
mod settings;
mod slice_reads;
mod slices;
mod trainer;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use libp2p::PeerId;
use libp2p_identity::Keypair;
use tokio::sync::mpsc;

use crate::aggregate::{Tensors, outer, zeros_like};
use crate::p2p::network::{Exchange, NetworkEvent, NetworkHandle};
use crate::wire::codec::Digest;
use crate::wire::compression::Compression;
use crate::wire::manifest::Manifest;
use crate::wire::tensors::encode;

use super::checkpoint::CheckpointError;
use super::misbehaviour::Misbehaviour;
use catch_up::Offers;
use claims::ClaimBook;
use average::Averaged;
use collect::Collected;
use inbox::Heard;
use quarantine::Verdicts;
use reduce::Reduced;

pub use clock::RoundClock;
pub use events::{EngineError, EngineEvent, MemberView, RoundReport, agreement};
pub use settings::{EngineSettings, PartitionMode};
pub use trainer::{LocalResult, RoundTrainer};

/// A peer's update for some round (its tensors: in the gossip exchange,
/// and this node's own).
#[derive(Clone)]
struct Update {
    manifest: Manifest,
    tensors: Option<Tensors>,
}

pub struct Engine<T: RoundTrainer> {
    pub net: NetworkHandle,
    pub events: mpsc::Receiver<NetworkEvent>,
    pub keypair: Keypair,
    pub trainer: T,
    pub settings: EngineSettings,
    pub reports: mpsc::UnboundedSender<EngineEvent>,
    /// What peers published: updates, who is active, round 0's announcements.
    heard: Heard,
    /// Slice owners' claims and the results they claimed.
    claims: ClaimBook,
    /// Peers left out of the run, and why.
    verdicts: Verdicts,
    /// Certified averages met while catching up.
    offers: Offers,
    /// The newest round of this node's own averages that was certified.
    certified_round: Option<u64>,
    /// This node's newest update, encoded (it reads its own slices from it).
    own_update: Option<Arc<Vec<u8>>>,
    /// The layout every adapter must have (the node's own initial adapter).
    layout: Tensors,
    /// The layout of an outer state (an average, a checkpoint): the adapter,
    /// and its momentum where the outer step keeps one.
    state_layout: Tensors,
    /// What compression left out of this node's updates so far (error
    /// feedback; empty when updates are not compressed).
    residual: Tensors,
    /// The round and decoded values of this node's newest compressed
    /// update (under top-k, what the average dropped of it goes back into
    /// the residual).
    sent: Option<(u64, Tensors)>,
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
            heard: Heard::default(),
            claims: ClaimBook::default(),
            verdicts: Verdicts::default(),
            offers: Offers::default(),
            certified_round: None,
            own_update: None,
            layout: Tensors::new(),
            state_layout: Tensors::new(),
            residual: Tensors::new(),
            sent: None,
        }
    }

    fn me(&self) -> PeerId {
        self.net.peer_id
    }

    /// Whether updates are compressed changes rather than adapters.
    fn compressed(&self) -> bool {
        self.settings.compression != Compression::None
    }

    fn report(&self, event: EngineEvent) {
        // A reader that went away only means nobody watches.
        let _ = self.reports.send(event);
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
        self.state_layout = outer::initial_state(self.settings.outer, &initial);
        if self.compressed() {
            self.residual = zeros_like(&initial);
        }
        self.layout = initial;
        // `current` is the outer state: the adapter the next round trains
        // from (and the outer momentum, where there is one).
        let (mut round, mut current) = (0, self.state_layout.clone());
        if let Some(file) = &self.settings.checkpoint
            && let Some(checkpoint) = file.load((&feedback::with_residual(&self.state_layout, &self.residual), &self.layout), &self.settings.limits)?
        {
            self.trainer.restore_optimizer_state(checkpoint.optimizer).await.map_err(EngineError::Trainer)?;
            let (state, residual) = feedback::split_residual(checkpoint.adapter);
            (round, current, self.residual) = (checkpoint.round, state, residual);
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
                RoundEnd::Done { report, state } => {
                    current = state;
                    *report
                }
                RoundEnd::Rejoin { round: next, state } => {
                    self.heard.buffered.retain(|r, _| *r >= next);
                    (round, current, rejoined) = (next, state, true);
                    continue;
                }
            };
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
            self.heard.buffered.retain(|r, _| *r >= round);
        }
        self.await_final_certificate().await?;
        self.report(EngineEvent::Finished);
        Ok(())
    }

    /// Writes the checkpoint of a node about to train `round` from the
    /// outer `state` (on a blocking thread: it fsyncs), listening meanwhile.
    async fn checkpoint(&mut self, round: u64, state: &Tensors) -> Result<(), EngineError> {
        let Some(file) = self.settings.checkpoint.clone() else { return Ok(()) };
        let optimizer = self.trainer.optimizer_state().await.map_err(EngineError::Trainer)?;
        let checkpoint = file.at(round, feedback::with_residual(state, &self.residual), optimizer);
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

    /// One round from the outer `state`, as docs/PROTOCOL.md ("A round")
    /// walks it; the quorum is every one of `members`.
    async fn round(&mut self, round: u64, state: &Tensors, members: &[PeerId]) -> Result<RoundEnd, EngineError> {
        let started = Instant::now();
        let current = &outer::adapter_of(state);
        // The start's hash: the certified state's (the adapter's, when the
        // state is just the adapter).
        let parent = Digest::of(&encode(state).map_err(EngineError::Aggregate)?);
        let member = members.contains(&self.me()) && self.settings.misbehaviour != Some(Misbehaviour::Silent);
        let rows = self.rows(members);
        // 1. Train (a node with no rows this round contributes its start
        //    adapter with zero weight; one that is not a member, nothing).
        let (update, local) = self.train(round, current, &rows, member).await?;
        // 2. Publish.
        if member {
            self.publish_update(round, parent, (current, update), &local, members).await?;
        }
        // 3. Collect until every member's update is in, or the deadline.
        let Collected { updates, timed_out } = self.collect(round, members, member).await?;
        let parents: BTreeMap<PeerId, Option<Digest>> = updates.iter().map(|(author, u)| (*author, u.manifest.parent)).collect();
        let same_parent = updates.values().filter(|u| u.manifest.parent == Some(parent)).count();
        // Each count is 0 or examples_per_round (check_claims), so the sum
        // is bounded by members × that; saturate rather than trust it.
        let examples: u64 = updates.values().fold(0u64, |sum, u| sum.saturating_add(u.manifest.examples));
        // 4. Average: every update here (gossip), or by slice (reduce).
        //    Compressed updates are changes: they move from zero.
        let zeros = self.compressed().then(|| zeros_like(current));
        let base = zeros.as_ref().unwrap_or(current);
        let mut averaged = match self.settings.exchange {
            Exchange::Gossip => self.average_all(base, updates)?,
            Exchange::Reduce => match self.reduce_round(round, base, updates).await? {
                Reduced::Average(averaged) => averaged,
                Reduced::Rejoin { round, state } => return Ok(RoundEnd::Rejoin { round, state }),
            },
        };
        self.claims.forget_through(round);
        if self.settings.compression == Compression::TopK {
            self.return_dropped(round, &averaged)?;
        }
        // 5. The outer step: the next state is what every node certifies
        //    and a joiner takes (the average itself under `average`).
        //    Compressed changes go onto the start most inputs trained from.
        if self.compressed() || self.settings.outer.has_momentum() {
            let taken = if self.compressed() { self.common_start(round, parent, &averaged.inputs, &parents).await? } else { None };
            let start = taken.as_ref().unwrap_or(state);
            let average = if self.compressed() { feedback::add(&outer::adapter_of(start), &averaged.average).map_err(EngineError::Aggregate)? } else { averaged.average };
            averaged.average = outer::step(self.settings.outer, start, &average).map_err(|e| EngineError::Aggregate(e.to_string()))?;
            averaged.bytes = encode(&averaged.average).map_err(EngineError::Aggregate)?;
        }
        let next = outer::adapter_of(&averaged.average);
        // 6. Evaluate, certify and keep the state, save its adapter.
        let eval_loss = self.evaluate(round, &next).await?;
        let average_hash = Digest::of(&averaged.bytes);
        let contributors = averaged.inputs.len();
        let (fedavg_drift, slices_computed) = (averaged.fedavg_drift, averaged.slices_computed);
        let state = self.keep_average(round, parent, examples, eval_loss, averaged).await?;
        self.save_average(round, &next).await?;
        tracing::debug!(round, contributors, expected = members.len(), timed_out, average = %average_hash, "round done");
        Ok(RoundEnd::Done {
            report: Box::new(RoundReport {
                round,
                average_hash,
                average: Arc::new(next),
                parent,
                contributors,
                expected: members.len(),
                timed_out,
                rows: rows.len(),
                local,
                eval_loss,
                agreement_before: same_parent as f64 / contributors.max(1) as f64,
                fedavg_drift,
                elapsed: started.elapsed(),
                members: self.member_views(members, round),
                slices_computed,
            }),
            state,
        })
    }

    /// Top-k's averages keep the largest values of each block of the
    /// inputs' mean, so some of what this node sent in `round` may not be
    /// in the average (all of it, if its update was not an input): that
    /// part goes back into the residual, to be sent again.
    fn return_dropped(&mut self, round: u64, averaged: &Averaged) -> Result<(), EngineError> {
        let Some((sent_round, sent)) = self.sent.take() else {
            return Ok(());
        };
        if sent_round == round {
            let averaged_mine = averaged.inputs.iter().any(|(author, _)| *author == self.me());
            self.residual = feedback::return_dropped(&self.residual, &sent, averaged_mine.then_some(&averaged.average)).map_err(EngineError::Aggregate)?;
        }
        Ok(())
    }

    /// Step 1: `round`'s local training on `rows` from `current`, listening
    /// meanwhile; a node without rows, or not a member, trains nothing.
    async fn train(&mut self, round: u64, current: &Tensors, rows: &[u64], member: bool) -> Result<(Tensors, LocalResult), EngineError> {
        if rows.is_empty() || !member {
            return Ok((current.clone(), LocalResult::default()));
        }
        let (trainer, start, picked) = (self.trainer.clone(), current.clone(), rows.to_vec());
        let training = async move { trainer.train(start, picked, round).await };
        self.while_listening(training, Some(round)).await?.map_err(EngineError::Trainer)
    }

    /// Step 5: the average's loss on the held-out rows, if asked for.
    async fn evaluate(&mut self, round: u64, average: &Tensors) -> Result<Option<f32>, EngineError> {
        if !self.settings.evaluate {
            return Ok(None);
        }
        let (trainer, adapter) = (self.trainer.clone(), average.clone());
        let evaluation = async move { trainer.evaluate(adapter).await };
        Ok(Some(self.while_listening(evaluation, Some(round + 1)).await?.map_err(EngineError::Trainer)?))
    }

    /// Step 5: the average in the mlx-lm format every `save_every` rounds
    /// and after the last (a failure is logged: training goes on).
    async fn save_average(&mut self, round: u64, average: &Tensors) -> Result<(), EngineError> {
        let Some(dir) = &self.settings.save_dir else { return Ok(()) };
        let every = u64::from(self.settings.save_every);
        if every == 0 || ((round + 1) % every != 0 && round + 1 != self.settings.rounds) {
            return Ok(());
        }
        let (trainer, adapter, dir) = (self.trainer.clone(), average.clone(), dir.join(format!("round-{round:04}")));
        let saving = async move { trainer.save(adapter, dir).await };
        if let Err(e) = self.while_listening(saving, Some(round + 1)).await? {
            tracing::error!(round, error = %e, "could not save the averaged adapter");
        }
        Ok(())
    }
}

/// How a round ended.
enum RoundEnd {
    /// The round's report, and the outer state the next round starts from.
    Done { report: Box<RoundReport>, state: Tensors },
    /// Peers went on meanwhile: train `round` next, from the certified
    /// outer `state`.
    Rejoin { round: u64, state: Tensors },
}
