//! Step 2 of a round: this node's update, signed and gossiped (and, for
//! `simulate --attack`, the forgeries an attacker adds).

use std::sync::Arc;

use libp2p::PeerId;

use crate::aggregate::Tensors;
use crate::p2p::network::{Exchange, NetworkError};
use crate::wire::codec::{CHUNK_SIZE, Digest};
use crate::wire::manifest::{MAX_ADDRESSES, MAX_ADDRESS_LEN, Manifest, SignedManifest};
use crate::wire::slices::SliceLayout;
use crate::wire::tensors::{encode, encode_as};

use super::{Engine, Update, feedback, slices};
use super::events::EngineError;
use super::members::members_digest;
use crate::node::misbehaviour::{Misbehaviour, scaled};
use super::trainer::{LocalResult, RoundTrainer};

impl<T: RoundTrainer> Engine<T> {
    pub(super) fn sign(&self, manifest: &Manifest) -> Result<SignedManifest, EngineError> {
        SignedManifest::sign(manifest, &self.keypair).map_err(|e| EngineError::Network(e.to_string()))
    }

    /// Signs and gossips this node's update of `round` (the adapter it
    /// trained from `start`, or under compression its change with the
    /// error feedback's residual), and keeps it for the round's average.
    /// Its chunks are the round's slices in the reduce exchange (as many as
    /// `members` make); a round-0 update names the member list it trained
    /// with.
    pub(super) async fn publish_update(&mut self, round: u64, parent: Digest, (start, trained): (&Tensors, Tensors), local: &LocalResult, members: &[PeerId]) -> Result<(), EngineError> {
        let chunk_size = match self.settings.exchange {
            Exchange::Gossip => CHUNK_SIZE,
            Exchange::Reduce => SliceLayout::new(&self.layout, slices::slice_count(members.len()), self.settings.compression).map_err(EngineError::Aggregate)?.chunk_size,
        };
        let members = (round == 0).then(|| members_digest(members));
        let (bytes, update) = if self.compressed() {
            let (bytes, sent, residual) = feedback::compress(start, &trained, &self.residual, self.settings.compression).map_err(EngineError::Aggregate)?;
            self.residual = residual;
            self.sent = Some((round, sent.clone()));
            (bytes, sent)
        } else {
            (encode(&trained).map_err(EngineError::Aggregate)?, trained)
        };
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
        self.heard.buffered.entry(round).or_default().insert(me, Update { manifest, tensors: Some(update) });
        Ok(())
    }

    /// `simulate --attack equivocate | future-round`: after its real update,
    /// an attacker publishes another one for the same round (×100), or the
    /// same one under rounds the run does not have.
    pub(super) async fn misbehave_with(&mut self, manifest: &Manifest, update: &Tensors) -> Result<(), EngineError> {
        let forgeries: Vec<(Manifest, Vec<u8>)> = match self.settings.misbehaviour {
            Some(Misbehaviour::Equivocate) => {
                let bytes = encode_as(&scaled(update, 100.0), self.settings.compression).map_err(EngineError::Aggregate)?;
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
                let bytes = encode_as(update, self.settings.compression).map_err(EngineError::Aggregate)?;
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

    /// Where peers can dial this node, for its manifests (at most
    /// `MAX_ADDRESSES`; none if the network cannot say).
    pub(super) async fn addresses(&self) -> Vec<String> {
        let addresses = self.net.reachable_addrs().await.unwrap_or_default();
        addresses.iter().map(ToString::to_string).filter(|a| a.len() <= MAX_ADDRESS_LEN).take(MAX_ADDRESSES).collect()
    }
}
