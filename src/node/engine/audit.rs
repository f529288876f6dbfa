//! Audits: a slice (or part of one) this node does not own, recomputed
//! from the signed inputs and compared with its owners' claims; owners
//! whose claim differs are liars.

use std::ops::Range;

use libp2p::PeerId;

use crate::wire::codec::Digest;
use crate::wire::slices::SliceLayout;

use super::{Engine, slices};
use super::events::{EngineError, EngineEvent};
use super::quarantine::Conviction;
use super::reduce::RoundView;
use super::slice_reads::{Fetch, read_range};
use super::slices::SliceInput;
use super::trainer::RoundTrainer;

impl<T: RoundTrainer> Engine<T> {
    /// What this node audits in `round`, if anything: a slice it neither
    /// owns nor computes anyway, and the part of it to check
    /// (`slices::audit_part`; `None`: the whole slice), picked by hashing
    /// (its key, round, pass), so owners cannot know who checks them. A
    /// node checks `audit` of a slice's values a round on average: a whole
    /// slice with probability `audit`, a part of a share f of the slice
    /// with probability `audit / f` (at most 1), so a wrong value is as
    /// likely to be checked either way, and a node's traffic no longer
    /// jumps by an adapter in the rounds it audits.
    pub(super) fn audit_pick(&self, round: u64, pass: usize, layout: &SliceLayout, owners: &[Vec<PeerId>], todo: &[usize]) -> Option<(usize, Option<Range<usize>>)> {
        let me = self.me();
        let candidates: Vec<usize> = (0..layout.count()).filter(|s| !owners[*s].contains(&me) && !todo.contains(s)).collect();
        let mut key = me.to_bytes();
        key.extend_from_slice(&round.to_le_bytes());
        key.extend_from_slice(&(pass as u64).to_le_bytes());
        let hash = Digest::of(&key).0;
        let word = |at: usize| u64::from_le_bytes(hash[at..at + 8].try_into().unwrap_or_default());
        let (roll, pick) = (word(0), word(8));
        let s = *candidates.get((roll % candidates.len().max(1) as u64) as usize)?;
        let part = slices::audit_part(layout, s, self.settings.method, pick);
        let share = part.as_ref().map_or(1.0, |p| p.len() as f64 / layout.value_range(s).len() as f64);
        let chance = (word(16) >> 11) as f64 / (1u64 << 53) as f64;
        (chance < self.settings.audit / share).then_some((s, part))
    }

    /// Checks part `part` of slice `s`'s agreed result `agreed` against
    /// that part computed here from the same part of every input (fetched
    /// alone, with proofs, from its author or the slice's owners): true if
    /// they match, or if some input's part could not be fetched (the audit
    /// is void then; the round does not wait on it).
    pub(super) async fn audit_part(&mut self, view: &RoundView<'_>, s: usize, part: Range<usize>, agreed: &[u8], previous: &[u8], owners: &[PeerId]) -> Result<bool, EngineError> {
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
            .and_then(|previous| slices::compute_part(view.layout, self.settings.method, &part, previous, &inputs));
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
    pub(super) fn expose_liars(&mut self, round: u64, s: usize, digest: Digest, owners: &[PeerId], chunk: &[u8]) {
        let truth = Digest::of(chunk);
        let Some(claims) = self.claims.by_slice.get(&(round, digest, s as u32)) else { return };
        let liars: Vec<(PeerId, Digest)> = owners.iter().filter_map(|o| claims.get(o).filter(|c| c.result != truth).map(|c| (*o, c.result))).collect();
        for (liar, claimed) in liars {
            let reason = format!("lying-reducer: claimed slice {s} of round {round} is {claimed}, the signed inputs give {truth}");
            self.report(EngineEvent::Rejected { peer: liar, reason: reason.clone() });
            self.quarantine(liar, reason, Conviction::Local);
        }
    }
}
