//! Round certificates as the network layer keeps them: this node's own
//! averages wait here for their peers' attestations until two thirds of
//! their contributors agree (then they are certified); certificates peers
//! served are held if they are better than what this node has; the best one
//! of each run is what late joiners get (docs/SECURITY.md, "Round
//! certificates"). Pure state: the event loop feeds it and acts on what it
//! returns.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use libp2p::PeerId;

use crate::wire::certificate::{Certificate, Certified, attests, threshold};
use crate::wire::codec::Digest;
use crate::wire::inputs::decode_inputs;
use crate::wire::manifest::{Manifest, SignedManifest};

/// Rounds of its own averages a node keeps collecting attestations for.
const DRAFT_ROUNDS: usize = 3;

/// A certificate became known: one of this node's own averages gathered
/// enough attestations, or a peer served one that checked out.
#[derive(Debug, Clone, PartialEq)]
pub struct CertificateNews {
    pub run_id: Digest,
    pub round: u64,
    pub average: Digest,
    pub signers: usize,
    pub contributors: usize,
    /// This node's own average (else a peer's certificate).
    pub own: bool,
}

/// One of this node's averages and the attestations gathered for it.
struct Draft {
    average: SignedManifest,
    manifest: Manifest,
    inputs: Vec<u8>,
    contributors: BTreeSet<PeerId>,
    attestations: BTreeMap<PeerId, SignedManifest>,
    certified: bool,
}

/// The certificate a run's late joiners are served.
struct Held {
    round: u64,
    signers: usize,
    chunk_ids: Vec<Digest>,
    bytes: Vec<u8>,
}

impl Held {
    /// A certificate backed by more signers wins; between equals, the newer
    /// round (docs/SECURITY.md says why signers come first).
    fn rank(&self) -> (usize, u64) {
        (self.signers, self.round)
    }
}

#[derive(Default)]
pub struct Certifier {
    drafts: BTreeMap<(Digest, u64), Draft>,
    held: HashMap<Digest, Held>,
    /// (run, round, attester) a seeding node asked for its certificate:
    /// when last, and how many times.
    asked: BTreeMap<(Digest, u64, PeerId), (Instant, u32)>,
    /// Runs this node takes part in (it published to them): it drafts its
    /// own certificates there, and asks nobody for theirs.
    member_of: HashSet<Digest>,
}

/// Certificate requests a seeding node remembers, at most.
const MAX_ASKED: usize = 4096;
/// An attester whose answer was an older round's certificate is asked
/// again this long after, up to `MAX_TRIES` times in all: it attests
/// before it has its peers' attestations, so the first answer is often the
/// round before, and no attestation comes again to prompt another ask (a
/// seeding relay missed a run's last round so).
const RETRY_AFTER: Duration = Duration::from_secs(1);
const MAX_TRIES: u32 = 5;

impl Certifier {
    /// This node's average of a round with its own attestation, and the
    /// attestations of that round it already stored (peers that averaged
    /// first). Returns the news if that is enough to certify it.
    pub fn draft(&mut self, average: SignedManifest, manifest: Manifest, inputs: Vec<u8>, own: (PeerId, SignedManifest), earlier: Vec<(PeerId, Manifest, SignedManifest)>) -> Result<Option<CertificateNews>, String> {
        let contributors = decode_inputs(&inputs)?.into_iter().map(|(peer, _)| peer).collect();
        let key = (manifest.run_id, manifest.round);
        let mut draft = Draft {
            average,
            manifest,
            inputs,
            contributors,
            attestations: BTreeMap::new(),
            certified: false,
        };
        draft.add(own.0, own.1);
        for (author, attestation, signed) in earlier {
            if draft.matches(&attestation) {
                draft.add(author, signed);
            }
        }
        self.drafts.insert(key, draft);
        while self.drafts.keys().filter(|(run, _)| *run == key.0).count() > DRAFT_ROUNDS {
            let Some(oldest) = self.drafts.keys().find(|(run, _)| *run == key.0).copied() else { break };
            self.drafts.remove(&oldest);
        }
        Ok(self.try_certify(key))
    }

    /// A verified attestation from gossip: counted if it agrees with this
    /// node's average of its round.
    pub fn attest(&mut self, attestation: &Manifest, author: PeerId, signed: &SignedManifest) -> Option<CertificateNews> {
        let key = (attestation.run_id, attestation.round);
        let draft = self.drafts.get_mut(&key).filter(|d| d.matches(attestation))?;
        draft.add(author, signed.clone());
        self.try_certify(key)
    }

    /// A certificate a peer served, already verified: held (true) if it
    /// ranks above what this node serves for its run.
    pub fn offer(&mut self, certificate: &Certificate, certified: &Certified) -> Result<bool, String> {
        let average = &certified.average;
        let held = Held {
            round: average.round,
            signers: certified.signers.len(),
            chunk_ids: average.chunk_ids.clone(),
            bytes: certificate.to_bytes().map_err(|e| e.to_string())?,
        };
        if self.held.get(&average.run_id).is_some_and(|h| h.rank() >= held.rank()) {
            return Ok(false);
        }
        self.held.insert(average.run_id, held);
        Ok(true)
    }

    /// Whether a node that averages nothing of this run (a seeding relay, a
    /// joiner) should ask `author` for its certificate, on seeing its
    /// attestation of a round newer than the one it serves: its author has
    /// averaged, and is the first to hold that round's certificate. Once
    /// for each attester and round.
    pub fn should_ask(&mut self, attestation: &Manifest, author: PeerId, now: Instant) -> bool {
        let run = attestation.run_id;
        let averaging = self.member_of.contains(&run) || self.drafts.keys().any(|(r, _)| *r == run);
        let newer = self.held.get(&run).is_none_or(|h| attestation.round > h.round);
        if averaging || !newer {
            return false;
        }
        let served = self.held.get(&run).map_or(0, |h| h.round);
        self.asked.retain(|(r, round, _), _| *r != run || *round > served);
        let key = (run, attestation.round, author);
        if self.asked.len() >= MAX_ASKED || self.asked.contains_key(&key) {
            return false;
        }
        self.asked.insert(key, (now, 1));
        true
    }

    /// (run, attester) to ask again at `now`: attesters of a round newer
    /// than the certificate this node serves, last asked `RETRY_AFTER` ago
    /// or more, fewer than `MAX_TRIES` times.
    pub fn asks_due(&mut self, now: Instant) -> Vec<(Digest, PeerId)> {
        let held = &self.held;
        let newer = |run: &Digest, round: u64| held.get(run).is_none_or(|h| round > h.round);
        self.asked.retain(|(run, round, _), _| newer(run, *round));
        self.asked
            .iter_mut()
            .filter(|(_, (at, tries))| *tries < MAX_TRIES && now.saturating_duration_since(*at) >= RETRY_AFTER)
            .map(|(&(run, _, author), (at, tries))| {
                (*at, *tries) = (now, *tries + 1);
                (run, author)
            })
            .collect()
    }

    /// This node published to `run_id` (an announcement or an update): it
    /// will average the run's rounds itself. Without this, a member still
    /// averaging its first round asked every peer that attested before it
    /// for a certificate (at 64 nodes, 8 KB each, some twenty a node).
    pub fn join(&mut self, run_id: Digest) {
        if self.member_of.len() < MAX_ASKED {
            self.member_of.insert(run_id);
        }
    }

    /// The encoded certificate late joiners of `run_id` get.
    pub fn served(&self, run_id: &Digest) -> Option<&[u8]> {
        self.held.get(run_id).map(|h| h.bytes.as_slice())
    }

    /// Chunks the store must keep: the served averages'.
    pub fn pinned(&self) -> impl Iterator<Item = Digest> + '_ {
        self.held.values().flat_map(|h| h.chunk_ids.iter().copied())
    }

    /// Forgets drafts of rounds before `round` (their chunks go with the
    /// store's clean-up; the held certificates stay).
    pub fn forget_before(&mut self, round: u64) {
        self.drafts.retain(|(_, r), _| *r >= round);
    }

    /// Certifies the draft under `key` once two thirds of its contributors
    /// attested, and serves it when it is the run's best: an own average is
    /// held whenever it is newer (this node's view of its run), more signers
    /// only break ties between rounds.
    fn try_certify(&mut self, key: (Digest, u64)) -> Option<CertificateNews> {
        let draft = self.drafts.get_mut(&key)?;
        let signers = draft.attestations.len();
        if signers < threshold(draft.contributors.len()) {
            return None;
        }
        let certificate = Certificate {
            average: draft.average.clone(),
            inputs: draft.inputs.clone(),
            attestations: draft.attestations.values().cloned().collect(),
        };
        // More attestations than a frame holds: serve what was last certified.
        let bytes = certificate.to_bytes().ok()?;
        let held = Held {
            round: key.1,
            signers,
            chunk_ids: draft.manifest.chunk_ids.clone(),
            bytes,
        };
        if self.held.get(&key.0).is_none_or(|h| (h.round, h.signers) <= (held.round, held.signers)) {
            self.held.insert(key.0, held);
        }
        let news = CertificateNews {
            run_id: key.0,
            round: key.1,
            average: draft.manifest.adapter_hash,
            signers,
            contributors: draft.contributors.len(),
            own: true,
        };
        // Reported once; later attestations only strengthen what is served.
        let first = !draft.certified;
        draft.certified = true;
        first.then_some(news)
    }
}

impl Draft {
    fn matches(&self, attestation: &Manifest) -> bool {
        attests(attestation, &self.manifest)
    }

    /// Counts a contributor's attestation (the first one of each).
    fn add(&mut self, author: PeerId, signed: SignedManifest) {
        if self.contributors.contains(&author) {
            self.attestations.entry(author).or_insert(signed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A seeding node asks an attester once on its attestation, then again
    /// on the tick while the round is not held, a bounded number of times.
    #[test]
    fn an_attester_is_asked_again_a_bounded_number_of_times() {
        let mut certifier = Certifier::default();
        let (run, author) = (Digest::of(b"run"), PeerId::random());
        let attestation = Manifest::attestation(run, 1, &author, Digest::of(b"average"), 10, Digest::of(b"inputs"));
        let start = Instant::now();
        assert!(certifier.should_ask(&attestation, author, start));
        assert!(!certifier.should_ask(&attestation, author, start), "an attestation prompts one ask");
        assert!(certifier.asks_due(start).is_empty(), "not again at once");
        let again: Vec<usize> = (1..=10).map(|k| certifier.asks_due(start + RETRY_AFTER * k).len()).collect();
        assert_eq!(again, [1, 1, 1, 1, 0, 0, 0, 0, 0, 0], "once a second, then no more");
    }
}
