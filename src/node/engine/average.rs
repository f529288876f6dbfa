//! Step 4 of a round in the gossip exchange: every update is here, whole,
//! and this node averages them all (the reduce exchange's step 4 is
//! `reduce.rs`). Both end in an [`Averaged`].

use std::collections::BTreeMap;

use libp2p::PeerId;

use crate::aggregate::{Contribution, Tensors, aggregate, fedavg_drift};
use crate::wire::codec::Digest;
use crate::wire::tensors::{decode_checked_as, encode_as};

use super::events::EngineError;
use super::trainer::RoundTrainer;
use super::{Engine, Update};

/// A round's average, by either exchange.
pub(super) struct Averaged {
    pub(super) average: Tensors,
    /// Its canonical encoding (its hash is the average's).
    pub(super) bytes: Vec<u8>,
    /// The (author, update hash) pairs it averaged, sorted by author.
    pub(super) inputs: Vec<(PeerId, Digest)>,
    /// ‖FedAvg update − exact average update‖ / ‖exact‖, if measured.
    pub(super) fedavg_drift: Option<f64>,
    /// Slices this node computed (the reduce exchange).
    pub(super) slices_computed: Option<usize>,
}

impl<T: RoundTrainer> Engine<T> {
    /// The gossip exchange's average of `updates`, inputs sorted by author.
    pub(super) fn average_all(&self, current: &Tensors, updates: BTreeMap<PeerId, Update>) -> Result<Averaged, EngineError> {
        let mut used = Vec::new();
        let inputs: Vec<Contribution> = updates
            .into_iter()
            .filter_map(|(author, u)| {
                let tensors = u.tensors?;
                used.push((author, u.manifest.adapter_hash));
                Some(Contribution {
                    author: author.to_bytes(),
                    examples: u.manifest.examples,
                    tensors,
                })
            })
            .collect();
        let fedavg_drift = if self.settings.measure_drift { fedavg_drift(inputs.clone()).ok() } else { None };
        let average = aggregate(self.settings.method, inputs, Some(current)).map_err(|e| EngineError::Aggregate(e.to_string()))?;
        // Compressed changes: the average in the same compression, as the
        // reduce exchange's slices write it, so that both exchanges (and
        // every node) take the same numbers from the same inputs.
        let bytes = encode_as(&average, self.settings.compression).map_err(EngineError::Aggregate)?;
        let average = if self.compressed() { decode_checked_as(&bytes, &average, self.settings.compression, &self.settings.limits).map_err(EngineError::Aggregate)? } else { average };
        Ok(Averaged {
            average,
            bytes,
            inputs: used,
            fedavg_drift,
            slices_computed: None,
        })
    }
}
