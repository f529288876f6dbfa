//! Step 4 of a round in the reduce exchange (docs/PROTOCOL.md, "The
//! reduce exchange"): this node computes and claims the slices it owns,
//! takes the others from their owners when they agree, computes the
//! contested, late and audited ones itself, and runs again without
//! inputs nobody could serve.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;

use libp2p::PeerId;

use crate::aggregate::Tensors;
use crate::p2p::network::NetworkError;
use crate::wire::{inputs, merkle};
use crate::wire::codec::Digest;
use crate::wire::manifest::{Manifest, ManifestKind, SliceClaim};
use crate::wire::slices::SliceLayout;
use crate::wire::tensors::{decode_checked_as, encode_as};

use super::{Engine, Update, slices};
use super::adopt::Adoption;
use super::average::Averaged;
use super::events::{EngineError, EngineEvent};
use super::slice_reads::{InputSource, compute_slices};
use crate::node::misbehaviour::Misbehaviour;
use super::trainer::RoundTrainer;

/// One pass of the reduce exchange: its inputs and how they are sliced.
pub(super) struct RoundView<'a> {
    pub(super) round: u64,
    pub(super) digest: Digest,
    pub(super) layout: &'a SliceLayout,
    pub(super) sources: &'a [InputSource],
}

/// Each slice's standby (`Engine::slice_owners`), if it has one.
pub(super) type Standbys = Vec<Option<PeerId>>;

/// How many slices one node computed in a round of the reduce exchange,
/// by why (`Engine::reduce_round`).
#[derive(Debug, Default)]
pub(super) struct ComputedSlices {
    pub(super) owned: usize,
    pub(super) contested: usize,
    pub(super) retried: usize,
    pub(super) taken_over: usize,
    pub(super) late: usize,
    pub(super) audited: usize,
}

impl ComputedSlices {
    pub(super) fn total(&self) -> usize {
        self.owned + self.contested + self.retried + self.taken_over + self.late + self.audited
    }
}

/// Passes of the reduce exchange in one round: each drops the inputs that
/// no peer could serve (an author that crashed after publishing), or
/// adopts the inputs that more owners averaged (`adopt_inputs`).
pub(super) const REDUCE_PASSES: usize = 4;

/// What the reduce exchange of a round gave.
pub(super) enum Reduced {
    Average(Averaged),
    /// Most peers went two rounds on meanwhile: train `round` next, from
    /// the certified outer `state`.
    Rejoin { round: u64, state: Tensors },
}

impl<T: RoundTrainer> Engine<T> {
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
    pub(super) async fn reduce_round(&mut self, round: u64, current: &Tensors, mut updates: BTreeMap<PeerId, Update>) -> Result<Reduced, EngineError> {
        let previous = Arc::new(encode_as(current, self.settings.compression).map_err(EngineError::Aggregate)?);
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
            updates.retain(|author, _| !self.verdicts.convicted.contains(author));
            if updates.is_empty() {
                // Every input's author is gone for this node (it came too
                // late to fetch them): peers that finished the round have
                // an average to rejoin from.
                if let Some((round, state)) = self.catch_up(Some(round)).await? {
                    return Ok(Reduced::Rejoin { round, state });
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
                convicted = updates.keys().any(|author| self.verdicts.convicted.contains(author));
                if adopted.is_some() || convicted {
                    break;
                }
                for s in 0..layout.count() {
                    if resolved[s].is_none() {
                        resolved[s] = self.claims.agreed_result(round, s, digest, (&group[s], owners[s].len()), &layout);
                    }
                }
                let contested: Vec<usize> = (0..layout.count()).filter(|s| resolved[*s].is_none() && self.claims.contested(round, *s, digest, &group[*s])).collect();
                if !contested.is_empty() {
                    computed.contested += contested.len();
                    for (_, missing) in self.settle_slices(compute(contested), &view, &group, &mut resolved).await? {
                        unavailable.extend(missing);
                    }
                }
                let retry: Vec<usize> = waiting.keys().copied().filter(|s| self.claims.claimed_by_others(round, digest, *s, &owners[*s])).collect();
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
                if let Some((round, state)) = self.rejoin_if_overtaken(round, updates.len(), &mut rejoin_tried).await? {
                    return Ok(Reduced::Rejoin { round, state });
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
            let average = decode_checked_as(&bytes, &self.layout, self.settings.compression, &self.settings.limits).map_err(|e| EngineError::Aggregate(format!("the assembled average: {e}")))?;
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
            return Ok(Reduced::Average(Averaged {
                average,
                bytes,
                inputs: pairs,
                fedavg_drift: None,
                slices_computed: Some(computed.total()),
            }));
        }
        Err(EngineError::Aggregate(format!("the reduce exchange of round {round} did not settle in {REDUCE_PASSES} passes")))
    }

    /// The slices the authors of `updates` cut them into, if they agree
    /// (they do when they saw the same members; else one per input), each
    /// slice's owners in `round`, and its standby: the next author on the
    /// ring, if there is one that is not an owner.
    pub(super) fn slice_owners(&self, round: u64, updates: &BTreeMap<PeerId, Update>) -> Result<(SliceLayout, Vec<Vec<PeerId>>, Standbys), EngineError> {
        let sizes: BTreeSet<u32> = updates.values().map(|u| u.manifest.chunk_size).collect();
        let layout = match sizes.iter().next() {
            Some(size) if sizes.len() == 1 => SliceLayout::with_chunk_size(&self.layout, *size as usize, self.settings.compression),
            _ => SliceLayout::new(&self.layout, slices::slice_count(updates.len()), self.settings.compression),
        }
        .map_err(EngineError::Aggregate)?;
        let authors: Vec<PeerId> = updates.keys().copied().collect();
        let replicas = self.settings.replicas;
        let mut owners = slices::owners(&self.settings.run_id, round, &authors, layout.count(), replicas + 1);
        let standby = owners.iter_mut().map(|ranked| if ranked.len() > replicas { ranked.pop() } else { None }).collect();
        Ok((layout, owners, standby))
    }

    /// Runs a slice computation while listening, and takes its results: a
    /// computed slice is the truth its owners' claims are checked against,
    /// and this node claims the ones it owns. Returns the slices that could
    /// not be computed, with the authors whose inputs could not be fetched.
    pub(super) async fn settle_slices(
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

    /// Gossips this node's one signed claim of the slices it computed
    /// (`results`, by slice, in increasing order). No addresses: owners are
    /// authors, whose update manifests gave theirs.
    pub(super) async fn claim_slices(&mut self, view: &RoundView<'_>, results: Vec<(usize, Vec<u8>)>) -> Result<(), EngineError> {
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
}
