//! Whole steps, pipelined (`train.pipeline`, the GPU's default): each step
//! one compiled function (`CompiledStep::train_step`), queued before the
//! loss of the one before it is read, so the host builds a step while the
//! device computes the last. `MlxTrainer::run_steps` drives it.

use std::collections::HashMap;
use std::rc::Rc;

use mlx_rs::Array;

use super::batch::Batch;
use super::lora::{AdapterParams, Dropout};
use super::step::CompiledStep;
use super::{MlxTrainer, TrainError, chunk_count, non_finite_loss};

/// A whole step queued with its loss not yet read.
pub(super) struct InFlightStep {
    pub(super) step: u64,
    pub(super) loss: Array,
    /// The adapter and optimizer moments before the step.
    pub(super) before: (AdapterParams, HashMap<Rc<str>, Array>),
}

impl MlxTrainer {
    /// Queues step `step` on `parts` as one compiled function (loss,
    /// gradients and update; `CompiledStep::train_step`) where the step is
    /// one micro-batch on one stream, unchunked (with `pipelined`): the
    /// adapter and the optimizer's moments become the step's (unevaluated)
    /// results, and the step's loss comes back with the state before it.
    /// `None`: this step takes the path of parts (split batches, chunked
    /// rows, op by op).
    pub(super) fn whole_step(&mut self, parts: &[Batch], step: u64, learning_rate: f32) -> Result<Option<InFlightStep>, TrainError> {
        let [batch] = parts else { return Ok(None) };
        if !self.config.compile || chunk_count(batch, self.part_count(usize::MAX)) > 1 {
            return Ok(None);
        }
        let dropout = Dropout::for_step(self.settings.dropout, self.config.seed, step, 0, self.projections.iter().map(String::as_str))?;
        let compiled = match &mut self.compiled {
            Some(compiled) => compiled,
            None => self.compiled.insert(CompiledStep::new(&self.decoder, &self.settings, &self.params, self.optimizer.kind)),
        };
        let before = (self.params.clone(), self.optimizer.state.clone());
        match compiled.train_step(&mut self.optimizer, &mut self.params, batch, &dropout, learning_rate) {
            Ok(loss) => Ok(Some(InFlightStep { step, loss, before })),
            // As in `loss_and_grads`: the adapter is untouched, go on op by op.
            Err(err) => {
                tracing::warn!(error = %err, "the compiled training step failed; training op by op from here (set train.compile = false to skip it)");
                self.config.compile = false;
                self.compiled = None;
                Ok(None)
            }
        }
    }

    /// Whether steps are whole compiled functions (`whole_step`) queued
    /// without waiting for the one before (`async_eval`), so the host
    /// builds step n + 1 while the device computes step n; a step's loss is
    /// read once the next is queued, and a non-finite one puts back the
    /// state before it (`InFlightStep`). `train.pipeline`; by default only
    /// off the CPU: there MLX computes on the host's cores, where the two
    /// functions evaluated in turn measured 6% faster than one (DoRA,
    /// 40-token rows), and an evaluation of a split batch must hold BLAS's
    /// thread count (`BlasHold`) until it is done.
    pub(super) fn pipelined(&self) -> bool {
        self.config.pipeline.unwrap_or(crate::mlx_env::backend() != crate::mlx_env::Backend::Cpu)
    }

    /// Waits for a queued step's loss. A non-finite loss puts the adapter
    /// and moments back as they were before that step (as the path of parts
    /// never updates after one) and names the step.
    pub(super) fn finish(&mut self, queued: InFlightStep) -> Result<f32, TrainError> {
        let loss = queued.loss.try_item_cast::<f32>()?;
        if !loss.is_finite() {
            (self.params, self.optimizer.state) = queued.before;
            return Err(non_finite_loss(loss, queued.step));
        }
        Ok(loss)
    }
}
