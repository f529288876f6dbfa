//! Gossip out: this node's signed manifests and, in the gossip exchange,
//! its chunks; everything published is kept in the store first.

use libp2p::gossipsub;

use crate::wire::codec::{ChunkMessage, Digest, split_chunks_of};
use crate::wire::manifest::{Manifest, ManifestKind, SignedManifest};

use super::{EventLoop, NetworkError};
use super::gossip::topics;

/// A run's newest verified update, served to late joiners of a run that
/// has no certified average (a `start --publish` demo, a seeding relay).
pub(super) struct Latest {
    pub(super) round: u64,
    /// Its chunks, kept through store clean-ups.
    pub(super) chunk_ids: Vec<Digest>,
    pub(super) signed: SignedManifest,
}

impl EventLoop {
    /// Stores the chunks and manifest and remembers them for catch-up.
    pub(super) fn keep<'a>(&mut self, signed: &SignedManifest, manifest: &Manifest, adapter: &'a [u8]) -> Result<Vec<(Digest, &'a [u8])>, NetworkError> {
        let chunks = split_chunks_of(adapter, manifest.chunk_size as usize);
        let store = |e: crate::store::StoreError| NetworkError::Store(e.to_string());
        for (id, chunk) in &chunks {
            self.store.put_chunk(id, chunk).map_err(store)?;
        }
        self.store.put_manifest(manifest.round, signed).map_err(store)?;
        self.remember_latest(manifest, signed);
        self.known.insert(manifest.adapter_hash, (manifest.round, manifest.chunk_ids.clone()));
        let ids: Vec<Digest> = chunks.iter().map(|(id, _)| *id).collect();
        // A peer's manifest may wait for these very chunks (a co-owner's
        // claim naming a slice this node computed too).
        self.complete_waiting_on(&ids);
        if manifest.chunk_root.is_some() {
            self.rooted.insert(manifest.adapter_hash, (manifest.round, ids));
        }
        Ok(chunks)
    }

    pub(super) fn publish(&mut self, signed: SignedManifest, manifest: Manifest, adapter: Vec<u8>, guarded: bool) -> Result<(), NetworkError> {
        let (manifest_topic, chunk_topic) = topics(&manifest.run_id);
        // A node restarted mid-round may train the round again on other
        // rows: signing a second update would be equivocation.
        if guarded && manifest.kind == ManifestKind::Update && self.published_another(&manifest) {
            return Err(NetworkError::Command(format!("this node already published another update for round {}", manifest.round)));
        }
        let chunks = self.keep(&signed, &manifest, &adapter)?;
        self.certifier.join(manifest.run_id);
        let bytes = signed.to_bytes().map_err(|e| NetworkError::Command(e.to_string()))?;
        let gossip = &mut self.swarm.behaviour_mut().gossipsub;
        let ignore_duplicate = |r: Result<gossipsub::MessageId, gossipsub::PublishError>| match r {
            Ok(_) | Err(gossipsub::PublishError::Duplicate) => Ok(()),
            Err(e) => Err(NetworkError::Command(format!("publish: {e}"))),
        };
        let mut published = bytes.len();
        ignore_duplicate(gossip.publish(manifest_topic, bytes))?;
        // In the reduce exchange updates stay here until their slices'
        // owners fetch them, and a slice result until nodes fetch it.
        let whole = manifest.kind == ManifestKind::Update && !self.reduce_runs.contains(&manifest.run_id);
        let chunks = if whole { chunks } else { Vec::new() };
        for (index, (_, chunk)) in chunks.into_iter().enumerate() {
            let message = ChunkMessage {
                adapter_hash: manifest.adapter_hash,
                index: index as u32,
                bytes: chunk.to_vec(),
            };
            let data = message.to_bytes().map_err(|e| NetworkError::Command(e.to_string()))?;
            published += data.len();
            ignore_duplicate(gossip.publish(chunk_topic.clone(), data))?;
        }
        self.count_sent(published);
        Ok(())
    }

    /// The newest update of each run, for late joiners when no certified
    /// average is held (an average is only ever served in its certificate).
    pub(super) fn remember_latest(&mut self, manifest: &Manifest, signed: &SignedManifest) {
        if manifest.kind != ManifestKind::Update {
            return;
        }
        if self.latest.get(&manifest.run_id).is_none_or(|known| manifest.round >= known.round) {
            let latest = Latest {
                round: manifest.round,
                chunk_ids: manifest.chunk_ids.clone(),
                signed: signed.clone(),
            };
            self.latest.insert(manifest.run_id, latest);
        }
    }
}
