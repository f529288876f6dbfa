//! The compiled training step (`train.compile`): the loss and gradients of a
//! micro-batch as one MLX function of arrays, traced once per batch shape,
//! simplified and fused by `mlx_compile` (what mlx-lm gets from `mx.compile`
//! over its step). Where a step is one micro-batch on one stream, the
//! optimizer's update joins the same function (`train_step`): one graph a
//! step, as mlx-lm's, so nothing waits on the host between the gradients
//! and the update. The uncompiled path in `MlxTrainer` computes the same
//! thing op by op.
//!
//! MLX traces a compiled function again for every new set of input shapes
//! and keeps each trace, so the traces are counted and the function is
//! rebuilt (its cache entries dropped) past `MAX_TRACED_SHAPES`: memory
//! stays bounded however many row lengths a data set has, without padding
//! rows to a few lengths as mlx-lm does (padding costs compute, and short
//! rows are where this trainer is fastest).

use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use mlx_rs::error::Exception;
use mlx_rs::{Array, Stream};

use super::batch::Batch;
use super::lora::{AdapterParams, Dropout, LoraApplier, LoraSettings};
use super::optim::{Optimizer, update};
use super::{TrainError, batch_loss, chunk_count, chunked_token_losses};
use crate::config::Optimizer as OptimizerKind;
use crate::model::Decoder;
use crate::model::attention::PackedRows;

/// How many batch shapes one compiled function may hold before it is rebuilt.
const MAX_TRACED_SHAPES: usize = 256;

type StepFunction = Box<dyn for<'a> FnMut(&'a [Array]) -> Result<Vec<Array>, Exception>>;

/// The loss and gradients as a plain (uncompiled) function of arrays: what
/// both compiled functions trace.
type LossGraph = Rc<dyn Fn(&[Array]) -> Result<Vec<Array>, Exception>>;

/// What decides a trace: the shapes of the inputs, whether the targets
/// are weighted (one more input) and whether the batch is packed (two more).
pub type ShapeKey = (Vec<i32>, i32, bool, bool);

/// `batch`'s trace key.
pub fn shape_key(batch: &Batch) -> ShapeKey {
    let targets = batch.target_positions.shape().first().copied().unwrap_or(0);
    (batch.tokens.shape().to_vec(), targets, batch.target_weights.is_some(), batch.packing.is_some())
}

/// The compiled functions of one trainer: loss and gradients, and the
/// optimizer's update.
///
/// The loss function's inputs, in order: the adapter tensors (sorted by
/// name), the batch's tokens, target positions and target ids, one dropout
/// key per adapted projection (sorted by path; none without dropout), the
/// target weights of a padded batch, and for a packed batch its segments
/// and positions. Its outputs: the loss, then one gradient per adapter
/// tensor, in the same order.
pub struct CompiledStep {
    decoder: Rc<Decoder>,
    settings: Rc<LoraSettings>,
    names: Rc<[Rc<str>]>,
    paths: Rc<[String]>,
    /// Streams for chunks 1.. of a one-row batch (`chunked_token_losses`);
    /// empty: rows are never chunked.
    chunk_streams: Rc<[Stream]>,
    graph: LossGraph,
    function: StepFunction,
    traced: HashSet<ShapeKey>,
    /// `MAX_TRACED_SHAPES` (smaller in a test).
    max_traced: usize,
    /// The optimizer's update of every adapter tensor, for `update_kind`.
    update: StepFunction,
    update_kind: OptimizerKind,
    /// Loss, gradients and update in one function (`train_step`), built at
    /// its first use, with the shapes it traced.
    whole_step: Option<(OptimizerKind, StepFunction)>,
    whole_step_traced: HashSet<ShapeKey>,
}

impl CompiledStep {
    /// The step for `params`' layout (names and shapes must not change
    /// afterwards; `set_adapter` checks that) on a copy of `decoder` (MLX
    /// arrays are reference-counted: no weight is copied).
    pub fn new(decoder: &Decoder, settings: &LoraSettings, params: &AdapterParams, optimizer: OptimizerKind) -> Self {
        Self::with_trace_limit(decoder, settings, params, optimizer, MAX_TRACED_SHAPES)
    }

    /// The step that cuts a one-row batch long enough into chunks computed
    /// on the default stream and `chunk_streams` at once (`chunk_count`).
    pub fn chunking_rows(mut self, chunk_streams: Vec<Stream>) -> Self {
        self.chunk_streams = chunk_streams.into();
        self.rebuild();
        self
    }

    /// New functions (dropping the old ones erases their traces from MLX's
    /// cache).
    fn rebuild(&mut self) {
        self.graph = loss_graph(&self.decoder, &self.settings, &self.names, &self.paths, &self.chunk_streams);
        self.function = compiled(&self.graph);
        self.traced.clear();
        self.whole_step = None;
        self.whole_step_traced.clear();
    }

    fn with_trace_limit(decoder: &Decoder, settings: &LoraSettings, params: &AdapterParams, optimizer: OptimizerKind, max_traced: usize) -> Self {
        let mut names: Vec<Rc<str>> = params.keys().cloned().collect();
        names.sort();
        let decoder = Rc::new(decoder.clone());
        let settings = Rc::new(settings.clone());
        let names: Rc<[Rc<str>]> = names.into();
        let paths: Rc<[String]> = super::lora::adapted_paths(params).into();
        let chunk_streams: Rc<[Stream]> = Rc::new([]);
        let graph = loss_graph(&decoder, &settings, &names, &paths, &chunk_streams);
        Self {
            decoder,
            settings,
            names,
            paths,
            chunk_streams,
            function: compiled(&graph),
            graph,
            traced: HashSet::new(),
            max_traced,
            update: build_update(optimizer),
            update_kind: optimizer,
            whole_step: None,
            whole_step_traced: HashSet::new(),
        }
    }

    /// `optimizer`'s update of every adapter tensor, as one compiled
    /// function (traced once: the shapes never change): a few fused
    /// kernels instead of a dozen operations a tensor.
    pub fn apply_update(&mut self, optimizer: &mut Optimizer, params: &mut AdapterParams, grads: &HashMap<Rc<str>, Array>, learning_rate: f32) -> Result<(), TrainError> {
        if optimizer.kind != self.update_kind {
            self.update = build_update(optimizer.kind);
            self.update_kind = optimizer.kind;
        }
        let mut inputs = vec![Array::from_f32(learning_rate)];
        for name in self.names.iter() {
            let (Some(param), Some(grad)) = (params.get(name), grads.get(name)) else {
                return Err(TrainError::Adapter(format!("no value or no gradient for {name}")));
            };
            inputs.extend([param.clone(), grad.clone()]);
            if let Some((m1, m2)) = optimizer.moments(name, grad)? {
                inputs.extend([m1, m2]);
            }
        }
        let outputs = (self.update)(&inputs)?;
        self.take_updated(optimizer, params, &outputs)
    }

    /// The loss (a scalar array, not yet evaluated) and the gradient of
    /// every adapter tensor for `batch`.
    pub fn loss_and_grads(&mut self, params: &AdapterParams, batch: &Batch, dropout: &Dropout) -> Result<(Array, HashMap<Rc<str>, Array>), TrainError> {
        let mut inputs = self.param_inputs(params)?;
        self.extend_with_batch(&mut inputs, batch, dropout)?;
        if note_shape(&mut self.traced, batch, self.max_traced) {
            self.rebuild();
            note_shape(&mut self.traced, batch, self.max_traced);
        }
        let mut outputs = (self.function)(&inputs)?.into_iter();
        let loss = outputs.next().ok_or_else(|| TrainError::Adapter("the compiled step returned nothing".into()))?;
        let grads: HashMap<Rc<str>, Array> = self.names.iter().cloned().zip(outputs).collect();
        if grads.len() != self.names.len() {
            return Err(TrainError::Adapter(format!("the compiled step returned {} gradients for {} tensors", grads.len(), self.names.len())));
        }
        Ok((loss, grads))
    }

    /// One whole optimizer step on `batch` as one compiled function: the
    /// loss and gradients, then `optimizer`'s update at `learning_rate`.
    /// `params` and `optimizer`'s moments become the updated (not yet
    /// evaluated) arrays; returns the loss, not yet evaluated either, so
    /// the caller evaluates everything once.
    pub fn train_step(&mut self, optimizer: &mut Optimizer, params: &mut AdapterParams, batch: &Batch, dropout: &Dropout, learning_rate: f32) -> Result<Array, TrainError> {
        let param_inputs = self.param_inputs(params)?;
        let moments_per_tensor = if optimizer.kind == OptimizerKind::Sgd { 0 } else { 2 };
        let mut inputs = Vec::with_capacity(1 + param_inputs.len() * (1 + moments_per_tensor) + self.paths.len() + 5);
        inputs.push(Array::from_f32(learning_rate));
        for (name, param) in self.names.iter().zip(&param_inputs) {
            if let Some((m1, m2)) = optimizer.moments(name, param)? {
                inputs.extend([m1, m2]);
            }
        }
        inputs.splice(1..1, param_inputs);
        self.extend_with_batch(&mut inputs, batch, dropout)?;
        let stale = self.whole_step.as_ref().is_some_and(|(kind, _)| *kind != optimizer.kind);
        if stale || note_shape(&mut self.whole_step_traced, batch, self.max_traced) {
            self.whole_step = None;
            self.whole_step_traced.clear();
            note_shape(&mut self.whole_step_traced, batch, self.max_traced);
        }
        let (_, function) = self
            .whole_step
            .get_or_insert_with(|| (optimizer.kind, compiled_whole_step(&self.graph, optimizer.kind, self.names.len())));
        let outputs = function(&inputs)?;
        let [loss, updated @ ..] = outputs.as_slice() else {
            return Err(TrainError::Adapter("the compiled step returned nothing".into()));
        };
        self.take_updated(optimizer, params, updated)?;
        Ok(loss.clone())
    }

    /// Puts a compiled update's outputs, `[(param[, m1, m2])…]` by sorted
    /// name, into `params` and `optimizer`'s moments.
    fn take_updated(&self, optimizer: &mut Optimizer, params: &mut AdapterParams, updated: &[Array]) -> Result<(), TrainError> {
        let per_tensor = if optimizer.kind == OptimizerKind::Sgd { 1 } else { 3 };
        if updated.len() != self.names.len() * per_tensor {
            return Err(TrainError::Adapter(format!("the compiled update returned {} arrays for {} tensors", updated.len(), self.names.len())));
        }
        for (name, updated) in self.names.iter().zip(updated.chunks(per_tensor)) {
            params.insert(name.clone(), updated[0].clone());
            if let [_, m1, m2] = updated {
                optimizer.set_moments(name, Some((m1.clone(), m2.clone())));
            }
        }
        Ok(())
    }

    /// The batch shapes its functions hold traces of (each was traced, and
    /// on a GPU its kernels looked up or built, once).
    pub fn traced_shapes(&self) -> usize {
        self.traced.len() + self.whole_step_traced.len()
    }

    /// The adapter tensors, sorted by name: the functions' first inputs.
    fn param_inputs(&self, params: &AdapterParams) -> Result<Vec<Array>, TrainError> {
        self.names
            .iter()
            .map(|name| {
                params
                    .get(name)
                    .cloned()
                    .ok_or_else(|| TrainError::Adapter(format!("the adapter has no tensor {name}")))
            })
            .collect()
    }

    /// The batch's inputs after the adapter's: tokens, target positions and
    /// ids, the dropout keys, the target weights, the packing.
    fn extend_with_batch(&self, inputs: &mut Vec<Array>, batch: &Batch, dropout: &Dropout) -> Result<(), TrainError> {
        inputs.extend([batch.tokens.clone(), batch.target_positions.clone(), batch.target_ids.clone()]);
        if self.settings.dropout > 0.0 {
            for path in self.paths.iter() {
                let key = dropout
                    .keys
                    .get(path)
                    .ok_or_else(|| TrainError::Adapter(format!("no dropout key for {path}")))?;
                inputs.push(key.clone());
            }
        }
        inputs.extend(batch.target_weights.clone());
        if let Some(rows) = &batch.packing {
            inputs.extend([rows.segments.clone(), rows.positions.clone()]);
        }
        Ok(())
    }
}

/// Records `batch`'s shape among a function's traces; true when the
/// function already holds `max_traced` other shapes and must be rebuilt
/// (the caller then clears `traced` and notes the shape again).
fn note_shape(traced: &mut HashSet<ShapeKey>, batch: &Batch, max_traced: usize) -> bool {
    let key = shape_key(batch);
    if traced.contains(&key) {
        return false;
    }
    if traced.len() >= max_traced {
        return true;
    }
    traced.insert(key);
    false
}

/// `batch_loss` under `value_and_grad` as a function of arrays only, to be
/// traced: MLX calls it again for each new input shape, never for a shape
/// it has seen.
fn loss_graph(decoder: &Rc<Decoder>, settings: &Rc<LoraSettings>, names: &Rc<[Rc<str>]>, paths: &Rc<[String]>, chunk_streams: &Rc<[Stream]>) -> LossGraph {
    let (decoder, settings, names, paths, chunk_streams) = (decoder.clone(), settings.clone(), names.clone(), paths.clone(), chunk_streams.clone());
    let argnums: Vec<i32> = (0..names.len() as i32).collect();
    let step = move |inputs: &[Array]| -> Result<Vec<Array>, Exception> {
        let (params, rest) = inputs.split_at(names.len().min(inputs.len()));
        let [tokens, target_positions, target_ids, rest @ ..] = rest else {
            return Err(Exception::custom("the compiled step needs tokens, target positions and target ids"));
        };
        let key_count = if settings.dropout > 0.0 { paths.len() } else { 0 };
        let (keys, rest) = rest.split_at(key_count.min(rest.len()));
        // After the keys: [weights] when padded, then [segments, positions] when packed.
        let (target_weights, packed) = match rest {
            [] => (None, None),
            [weights] => (Some(weights.clone()), None),
            [segments, positions] => (None, Some((segments, positions))),
            [weights, segments, positions] => (Some(weights.clone()), Some((segments, positions))),
            _ => return Err(Exception::custom("the compiled step got an unexpected number of inputs")),
        };
        let packing = packed.map(|(segments, positions)| PackedRows {
            segments: segments.clone(),
            positions: positions.clone(),
        });
        let dropout = Dropout {
            probability: settings.dropout,
            keys: paths.iter().cloned().zip(keys.iter().cloned()).collect(),
        };
        let batch = Batch {
            tokens: tokens.clone(),
            target_positions: target_positions.clone(),
            target_ids: target_ids.clone(),
            target_weights,
            packing,
            target_tokens: target_positions.shape().first().copied().unwrap_or(0) as usize,
            real_tokens: 0,
        };
        // A long row in chunks: chunk c > 0 draws its dropout masks from
        // keys split from chunk c - 1's, so no two chunks share a mask.
        let chunks = chunk_count(&batch, chunk_streams.len() + 1);
        let mut dropouts = vec![dropout];
        while dropouts.len() < chunks {
            let previous = &dropouts[dropouts.len() - 1];
            let mut keys = HashMap::with_capacity(previous.keys.len());
            for (path, key) in &previous.keys {
                keys.insert(path.clone(), mlx_rs::random::split(key, 2)?.1);
            }
            dropouts.push(Dropout { probability: previous.probability, keys });
        }
        let streams: Vec<Option<Stream>> = std::iter::once(None).chain(chunk_streams.iter().take(chunks - 1).cloned().map(Some)).collect();
        let loss = |params: &[Array]| -> Result<Vec<Array>, Exception> {
            let params: AdapterParams = names.iter().cloned().zip(params.iter().cloned()).collect();
            let appliers: Vec<LoraApplier> = dropouts
                .iter()
                .map(|dropout| LoraApplier {
                    params: &params,
                    settings: &settings,
                    dropout: Some(dropout),
                })
                .collect();
            let loss = match chunks {
                1 => batch_loss(&decoder, &appliers[0], &batch),
                _ => chunked_token_losses(&decoder, &appliers, &batch, &streams).and_then(|losses| Ok(losses.mean(None)?)),
            };
            loss.map(|loss| vec![loss])
                .map_err(|e| Exception::custom(e.to_string()))
        };
        let (values, grads) = mlx_rs::transforms::value_and_grad_with_argnums(loss, argnums.as_slice())(params)?;
        Ok(values.into_iter().chain(grads).collect())
    };
    Rc::new(step)
}

/// The loss and gradients, compiled.
fn compiled(graph: &LossGraph) -> StepFunction {
    let graph = graph.clone();
    Box::new(mlx_rs::transforms::compile::compile(move |inputs: &[Array]| graph(inputs), None))
}

/// Loss, gradients and `kind`'s update of `tensors` adapter tensors as one
/// compiled function over `[learning rate, params…, (m1, m2)…, batch…]`
/// (the batch as the loss graph takes it), returning `[loss, (param[, m1,
/// m2])…]`.
fn compiled_whole_step(graph: &LossGraph, kind: OptimizerKind, tensors: usize) -> StepFunction {
    let graph = graph.clone();
    let moments_per_tensor = if kind == OptimizerKind::Sgd { 0 } else { 2 };
    let step = move |inputs: &[Array]| -> Result<Vec<Array>, Exception> {
        let [lr, rest @ ..] = inputs else {
            return Err(Exception::custom("the compiled step needs a learning rate"));
        };
        if rest.len() < tensors * (1 + moments_per_tensor) {
            return Err(Exception::custom("the compiled step got too few inputs"));
        }
        let (params, rest) = rest.split_at(tensors);
        let (moments, batch) = rest.split_at(tensors * moments_per_tensor);
        let graph_inputs: Vec<Array> = params.iter().chain(batch).cloned().collect();
        let outputs = graph(&graph_inputs)?;
        let [loss, grads @ ..] = outputs.as_slice() else {
            return Err(Exception::custom("the loss graph returned nothing"));
        };
        let mut updated = Vec::with_capacity(1 + tensors * (1 + moments_per_tensor));
        updated.push(loss.clone());
        for (index, (param, grad)) in params.iter().zip(grads).enumerate() {
            let tensor_moments = (moments_per_tensor > 0).then(|| (&moments[2 * index], &moments[2 * index + 1]));
            let (param, tensor_moments) = update(kind, param, grad, tensor_moments, lr)?;
            updated.push(param);
            if let Some((m1, m2)) = tensor_moments {
                updated.extend([m1, m2]);
            }
        }
        Ok(updated)
    };
    Box::new(mlx_rs::transforms::compile::compile(step, None))
}

/// The optimizer update over `[learning rate, (param, grad[, m1, m2])…]`,
/// returning `[(param[, m1, m2])…]`.
fn build_update(kind: OptimizerKind) -> StepFunction {
    let per_tensor = if kind == OptimizerKind::Sgd { 2 } else { 4 };
    let step = move |inputs: &[Array]| -> Result<Vec<Array>, Exception> {
        let [lr, tensors @ ..] = inputs else {
            return Err(Exception::custom("the compiled update needs a learning rate"));
        };
        let mut outputs = Vec::with_capacity(tensors.len());
        for tensor in tensors.chunks(per_tensor) {
            let (param, grad, moments) = match tensor {
                [param, grad] => (param, grad, None),
                [param, grad, m1, m2] => (param, grad, Some((m1, m2))),
                _ => return Err(Exception::custom("the compiled update got an incomplete tensor")),
            };
            let (param, moments) = update(kind, param, grad, moments, lr)?;
            outputs.push(param);
            if let Some((m1, m2)) = moments {
                outputs.extend([m1, m2]);
            }
        }
        Ok(outputs)
    };
    Box::new(mlx_rs::transforms::compile::compile(step, None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LoadOptions, QuantMode, load_model};
    use crate::train::batch::{Encoded, make_batch};

    /// Past its limit of traced shapes the step rebuilds itself, and its
    /// losses stay those of the op-by-op step.
    #[test]
    fn a_rebuilt_step_keeps_computing_the_same_losses() {
        let model = load_model("tiny", &LoadOptions { quant: QuantMode::Keep }).unwrap();
        let settings = LoraSettings {
            dora: true,
            num_layers: 2,
            rank: 4,
            scale: 10.0,
            dropout: 0.0,
            keys: vec!["self_attn.q_proj".into(), "mlp.down_proj".into()],
        };
        let params = settings.init(&model.decoder, 3).unwrap();
        let mut step = CompiledStep::with_trace_limit(&model.decoder, &settings, &params, OptimizerKind::Adamw, 2);
        let dropout = Dropout::for_step(0.0, 0, 0, 0, []).unwrap();
        for len in [5usize, 9, 13, 9, 17, 5] {
            let example = Encoded { tokens: (0..len as u32).map(|t| 3 + t * 7 % 50).collect(), prompt_len: 0 };
            let batch = make_batch(&[&example], false, false, 1).unwrap();
            let (loss, grads) = step.loss_and_grads(&params, &batch, &dropout).unwrap();
            let applier = LoraApplier { params: &params, settings: &settings, dropout: None };
            let expected = batch_loss(&model.decoder, &applier, &batch).unwrap().try_item_cast::<f32>().unwrap();
            let loss = loss.try_item_cast::<f32>().unwrap();
            assert!((loss - expected).abs() <= 1e-5 * expected.abs(), "length {len}: compiled {loss}, op by op {expected}");
            assert_eq!(grads.len(), params.len());
            assert!(step.traced.len() <= 2, "{} shapes held", step.traced.len());
        }
    }
}
