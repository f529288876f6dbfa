//! Step 5 of a round: this node's average kept with its signed
//! attestation and served inside its certificate; certificates that come
//! back, and the last round's wait for one.

use std::time::{Duration, Instant};

use crate::aggregate::Tensors;
use crate::p2p::certify::CertificateNews;
use crate::p2p::network::Average;
use crate::wire::inputs;
use crate::wire::codec::Digest;
use crate::wire::manifest::{Manifest, ManifestKind};
use crate::wire::tensors::encode;

use super::Engine;
use super::average::Averaged;
use super::catch_up::MAX_OFFERED;
use super::events::{EngineError, EngineEvent};
use crate::node::misbehaviour::{Misbehaviour, scaled};
use super::trainer::RoundTrainer;

/// How long a node that finished its last round waits for that round's
/// certificate (its peers' attestations), so late joiners and seeding
/// relays can take the final average.
pub(super) const FINAL_CERTIFICATE_WAIT: Duration = Duration::from_secs(10);
/// How long a node whose run a peer asked certificates of (a seeding
/// relay, a joiner) keeps serving once its last round is certified: such a
/// peer asks when it sees an attestation, often before the certificate
/// exists, and asks again each second (`Certifier::asks_due`).
pub(super) const FINAL_SERVE: Duration = Duration::from_secs(3);

impl<T: RoundTrainer> Engine<T> {
    /// A certificate: this node's own average certified (reported), or one a
    /// peer served (a catch-up candidate, for a round the run has).
    pub(super) fn on_certified(&mut self, news: CertificateNews) {
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
        if quorate && news.round < self.settings.rounds && (self.offers.offered.len() < MAX_OFFERED || self.offers.offered.contains_key(&news.average)) {
            self.offers.offered.insert(news.average, (news.signers, news.round));
        }
    }

    /// Step 5: this node's average of `round`, kept and served to late
    /// joiners inside its certificate, never gossiped (nodes that agree
    /// already hold these chunks); its attestation is gossiped
    /// (docs/SECURITY.md, "Round certificates"). Then the store forgets
    /// what is two rounds old. Its encoding goes to the network (no copy of
    /// an adapter a round); the tensors come back for the report.
    pub(super) async fn keep_average(&mut self, round: u64, parent: Digest, examples: u64, eval_loss: Option<f32>, averaged: Averaged) -> Result<Tensors, EngineError> {
        let Averaged { average, bytes, inputs: used, .. } = averaged;
        let inputs_list = inputs::encode_inputs(&used);
        let average_manifest = Manifest {
            kind: ManifestKind::Average,
            parent: Some(parent),
            examples,
            eval_loss,
            inputs: Some(Digest::of(&inputs_list)),
            ..Manifest::describe(self.settings.run_id, round, &self.me(), &bytes)
        };
        let kept = match self.settings.misbehaviour {
            Some(Misbehaviour::FakeAverage) => self.fake_average(round, &average)?,
            _ => self.attested(average_manifest, bytes, inputs_list)?,
        };
        if self.settings.misbehaviour != Some(Misbehaviour::Silent) {
            self.net.keep_average(kept).await.map_err(|e| EngineError::Network(e.to_string()))?;
        }
        if let Err(e) = self.net.forget_before(round.saturating_sub(1)).await {
            tracing::warn!(error = %e, "store clean-up failed");
        }
        Ok(average)
    }

    /// `simulate --attack fake-average`: in place of its real average, a
    /// poisoned one (×100), certified by the attacker alone as the average
    /// of an input list naming only itself; it serves that to joiners.
    pub(super) fn fake_average(&self, round: u64, average: &Tensors) -> Result<Average, EngineError> {
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
    pub(super) fn attested(&self, manifest: Manifest, bytes: Vec<u8>, inputs: Vec<u8>) -> Result<Average, EngineError> {
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

    /// After the last round, listens until its average is certified (peers
    /// still averaging attest it; late joiners and seeding relays then take
    /// the run's final average), for `FINAL_CERTIFICATE_WAIT` at most, then
    /// `FINAL_SERVE` more where a peer asked for certificates.
    pub(super) async fn await_final_certificate(&mut self) -> Result<(), EngineError> {
        let last = self.settings.rounds.saturating_sub(1);
        let started = Instant::now();
        // Bounded by the wait.
        while self.certified_round.is_none_or(|r| r < last) && started.elapsed() < FINAL_CERTIFICATE_WAIT {
            self.sleep_listening(Duration::from_millis(100), None).await?;
        }
        let asked = self.net.asked_for_latest(self.settings.run_id).await.map_err(|e| EngineError::Network(e.to_string()))?;
        if asked && self.certified_round.is_some_and(|r| r >= last) {
            self.sleep_listening(FINAL_SERVE, None).await?;
        }
        Ok(())
    }
}
