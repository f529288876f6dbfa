//! Slice owners' signed claims and the results they claimed, kept per
//! (round, inputs, slice) in bounded memory: what the reduce exchange
//! believes when the owners agree.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use libp2p::PeerId;

use crate::wire::codec::Digest;
use crate::wire::manifest::Manifest;
use crate::wire::slices::SliceLayout;

use super::Engine;
use super::events::EngineEvent;
use super::inbox::in_window;
use super::trainer::RoundTrainer;

/// Slice owners' claims and the results they claimed (the reduce exchange),
/// for the rounds in this node's window.
#[derive(Default)]
pub(super) struct ClaimBook {
    /// Slice claims by (round, inputs digest, slice) and owner.
    pub(super) by_slice: BTreeMap<(u64, Digest, u32), BTreeMap<PeerId, ClaimSeen>>,
    /// Claimed slice results' chunks (at most 256 KiB each), by hash, with their round.
    pub(super) results: HashMap<Digest, (u64, Vec<u8>)>,
}

/// What a slice owner claimed a slice over some inputs is.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ClaimSeen {
    pub(super) result: Digest,
    pub(super) chunk_size: u32,
}

/// Slice claims kept per (round, inputs, slice), and claimed results in all.
pub(super) const MAX_CLAIMS_PER_SLICE: usize = 8;

pub(super) const MAX_SLICE_RESULTS: usize = 16_384;

impl<T: RoundTrainer> Engine<T> {
    /// Keeps the slice results of a claim whose chunks arrived (checked
    /// against the claim's hash by the network), each under its chunk id;
    /// whether they are believed is for `reduce_round`.
    pub(super) fn keep_slice_results(&mut self, manifest: &Manifest, bytes: &[u8]) {
        let Some(claim) = &manifest.slice else { return };
        let Ok(layout) = SliceLayout::with_chunk_size(&self.layout, manifest.chunk_size as usize, self.settings.compression) else { return };
        let mut held: usize = self.claims.results.values().map(|(_, b)| b.len()).sum();
        let mut rest = bytes;
        for (index, id) in claim.indices.iter().zip(&manifest.chunk_ids) {
            let len = if (*index as usize) < layout.count() { layout.range(*index as usize).len() } else { return };
            let Some((result, tail)) = rest.split_at_checked(len) else { return };
            rest = tail;
            held = held.saturating_add(result.len());
            if Digest::of(result) != *id || self.claims.results.len() >= MAX_SLICE_RESULTS || held > self.settings.limits.max_adapter_bytes.saturating_mul(4) {
                return;
            }
            self.claims.results.insert(*id, (manifest.round, result.to_vec()));
        }
    }

    /// Keeps a slice owner's claim for a round in the window (one per owner,
    /// inputs and slice; a second, different one from the same owner over
    /// the same inputs is equivocation, and the first stands; a claim over
    /// other inputs is not: an owner that drops an unavailable input or
    /// adopts its peers' inputs claims its slices again).
    pub(super) fn on_claim(&mut self, manifest: &Manifest, author: PeerId, from: Option<u64>) {
        let ours = manifest.run_id == self.settings.run_id && author != self.me() && !self.verdicts.excluded.contains_key(&author);
        let Some(claim) = manifest.slice.as_ref().filter(|_| ours && in_window(manifest.round, from)) else { return };
        for (index, result) in claim.indices.iter().zip(&manifest.chunk_ids) {
            let key = (manifest.round, claim.inputs, *index);
            if !self.claims.by_slice.contains_key(&key) && self.claims.by_slice.len() >= MAX_SLICE_RESULTS {
                return;
            }
            let claims = self.claims.by_slice.entry(key).or_default();
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
}

impl ClaimBook {
    /// Whether an owner of slice `s` other than this node claimed it over `digest`.
    pub(super) fn claimed_by_others(&self, round: u64, digest: Digest, s: usize, owners: &[PeerId]) -> bool {
        self.by_slice.get(&(round, digest, s as u32)).is_some_and(|claims| claims.keys().any(|c| owners.contains(c)))
    }

    /// Slice `s`'s result if at least `quorum` of `group` (its owners, and
    /// its standby once it took over) claimed it over `digest`, none of them
    /// claimed another, and its chunk is here.
    pub(super) fn agreed_result(&self, round: u64, s: usize, digest: Digest, (group, quorum): (&[PeerId], usize), layout: &SliceLayout) -> Option<Vec<u8>> {
        let claims = self.by_slice.get(&(round, digest, s as u32))?;
        let present: Vec<&ClaimSeen> = group.iter().filter_map(|o| claims.get(o)).collect();
        let first = present.first()?;
        if present.len() < quorum.max(1) || !present.iter().all(|c| c.result == first.result && c.chunk_size as usize == layout.chunk_size) {
            return None;
        }
        self.results.get(&first.result).map(|(_, bytes)| bytes.clone()).filter(|b| b.len() == layout.range(s).len())
    }

    /// Whether slice `s`'s owners made claims over `digest` that differ.
    pub(super) fn contested(&self, round: u64, s: usize, digest: Digest, owners: &[PeerId]) -> bool {
        let Some(claims) = self.by_slice.get(&(round, digest, s as u32)) else { return false };
        let results: BTreeSet<Digest> = owners.iter().filter_map(|o| claims.get(o)).map(|c| c.result).collect();
        results.len() > 1
    }

    /// Forgets the claims and results of `round` and every round before it.
    pub(super) fn forget_through(&mut self, round: u64) {
        self.by_slice.retain(|(r, _, _), _| *r > round);
        self.results.retain(|_, (r, _)| *r > round);
    }

    /// Who claimed which slices of `round`, by the inputs digest they
    /// claimed over.
    pub(super) fn claimants(&self, round: u64) -> BTreeMap<Digest, BTreeMap<PeerId, BTreeSet<u32>>> {
        let mut claimants: BTreeMap<Digest, BTreeMap<PeerId, BTreeSet<u32>>> = BTreeMap::new();
        let lowest = (round, Digest([0; 32]), 0);
        let highest = (round, Digest([0xff; 32]), u32::MAX);
        for ((_, inputs, slice), claims) in self.by_slice.range(lowest..=highest) {
            for owner in claims.keys() {
                claimants.entry(*inputs).or_default().entry(*owner).or_default().insert(*slice);
            }
        }
        claimants
    }
}
