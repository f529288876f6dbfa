//! Adopting the inputs most owners averaged: a node that came late, or
//! saw other updates than most, ends on their average instead of its own.

use std::collections::{BTreeMap, BTreeSet};

use libp2p::PeerId;

use crate::wire::inputs;
use crate::wire::codec::Digest;

use super::{Engine, Update};
use super::events::EngineError;
use super::trainer::RoundTrainer;

/// The reduce exchange's input lists of one round, as `adopt_inputs` met them.
#[derive(Default)]
pub(super) struct Adoption {
    pub(super) adopted: usize,
    /// Fetched and decoded, by hash.
    pub(super) lists: BTreeMap<Digest, Vec<(PeerId, Digest)>>,
    /// Lists that cannot be adopted (malformed, other updates than this
    /// node holds, excluded authors, too few real owners).
    pub(super) refused: BTreeSet<Digest>,
    /// Lists for which peers were asked for the round's manifests.
    pub(super) asked: BTreeSet<Digest>,
    /// Fetches of each list so far.
    pub(super) fetches: BTreeMap<Digest, usize>,
    /// Authors whose updates this node could not fetch: a list with one of
    /// them cannot be computed here.
    pub(super) unavailable: BTreeSet<PeerId>,
}

/// Input lists a node adopts in one round at most, and the fetches of one
/// list it tries.
pub(super) const MAX_ADOPTIONS: usize = 2;

pub(super) const MAX_LIST_FETCHES: usize = 3;

impl<T: RoundTrainer> Engine<T> {
    /// The inputs more of this round's owners averaged than averaged
    /// `mine`, if this node holds the signed manifest of every one of them:
    /// a node that came late, or missed or got an update the others did
    /// not, ends on their average instead of computing its own. The list
    /// is fetched from its claimants under its hash; a claimant counts only
    /// if it owns, under that list, the slice it claimed (so a peer cannot
    /// make up a list and claim it under many names). A list with authors
    /// whose manifests are not here yet asks peers for the round's
    /// manifests and is tried again as they come.
    pub(super) async fn adopt_inputs(
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
        let claimants = self.claims.claimants(round);
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
            let held = updates.get(author).or_else(|| self.heard.buffered.get(&round).and_then(|b| b.get(author)));
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
                None if !self.verdicts.excluded.contains_key(author) => {
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
}
