//! The trainer every node runs: LoRA/DoRA fine-tuning of a frozen model with
//! MLX. It knows nothing of peers: the round engine drives it through
//! `LocalTrainer` (set the adapter, train n steps on these rows, evaluate,
//! get the adapter), and so does `blossom-p2p train`.

pub mod adapters;
pub mod batch;
pub mod checkpoint;
pub mod flops;
pub mod lora;
pub mod metrics;
pub mod optim;
pub mod order;
mod pipeline;
pub mod schedule;
pub mod step;

use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use batch::{Batch, Encoded, encode, make_batch};
use lora::{AdapterParams, Dropout, LoraApplier, LoraSettings};
use mlx_rs::error::Exception;
use mlx_rs::{Array, Device, Stream};
use optim::Optimizer;
use order::BatchOrder;
use pipeline::InFlightStep;
use schedule::Schedule;
use step::CompiledStep;

use crate::config::{Config, TrainConfig};
use crate::data::template::PromptTemplate;
use crate::data::{Dataset, Row, load_dataset};
use crate::model::attention::Layout;
use crate::model::{Decoder, ModelError, Tokenizer};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("LoRA settings: {0}")]
    Settings(String),
    #[error("data: {0}")]
    Data(String),
    #[error("adapter: {0}")]
    Adapter(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("MLX: {0}")]
    Mlx(#[from] Exception),
    #[error("MLX value conversion: {0}")]
    Conversion(#[from] mlx_rs::error::ConversionError),
    #[error("{0}")]
    Io(String),
}

/// What a stretch of training did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrainReport {
    pub steps: u64,
    /// Mean loss over the steps.
    pub loss: f32,
    pub examples: u64,
    /// Target tokens the loss counted.
    pub tokens: u64,
    /// All real tokens the model processed (mlx-lm's "Tokens/sec" counts these).
    pub processed_tokens: u64,
    /// Input positions the model computed, padding included (lines × length).
    pub computed_tokens: u64,
    /// The most MLX streams a step's batch was split over (`train.cpu_streams`).
    pub streams: u32,
    pub elapsed: Duration,
    pub last_learning_rate: f32,
    /// Where `elapsed` went.
    pub phases: PhaseTimes,
}

impl TrainReport {
    /// Adds the stretch of training that followed this one.
    pub fn absorb(&mut self, later: TrainReport) {
        let steps = self.steps + later.steps;
        if steps > 0 {
            self.loss = ((f64::from(self.loss) * self.steps as f64 + f64::from(later.loss) * later.steps as f64) / steps as f64) as f32;
        }
        self.steps = steps;
        self.examples += later.examples;
        self.tokens += later.tokens;
        self.processed_tokens += later.processed_tokens;
        self.computed_tokens += later.computed_tokens;
        self.streams = self.streams.max(later.streams);
        self.elapsed += later.elapsed;
        self.last_learning_rate = later.last_learning_rate;
        self.phases.data += later.phases.data;
        self.phases.forward_backward += later.phases.forward_backward;
        self.phases.optimizer += later.phases.optimizer;
        self.phases.queuing += later.phases.queuing;
        self.phases.waiting += later.phases.waiting;
    }
}

/// Time spent in each phase of the training steps.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PhaseTimes {
    /// Choosing rows, tokenizing (first use only) and building batches.
    pub data: Duration,
    /// The forward and backward passes (loss and gradients, evaluated).
    pub forward_backward: Duration,
    /// Summing accumulated gradients and the optimizer update, evaluated.
    pub optimizer: Duration,
    /// Of `forward_backward`, with `train.pipeline`: the host building and
    /// queuing whole steps (tracing a new shape included) ...
    pub queuing: Duration,
    /// ... and waiting for the device to finish the step queued before.
    /// Mostly queuing: the host bounds the step (kernel launches, graph
    /// building); mostly waiting: the device does.
    pub waiting: Duration,
}

/// Loss on a set of rows.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EvalReport {
    pub loss: f32,
    pub tokens: u64,
}

impl EvalReport {
    pub fn perplexity(&self) -> f32 {
        self.loss.exp()
    }
}

/// The configured data set (`data.dataset`, `data.template`, `train.seed`).
pub fn load_data(config: &Config) -> Result<Dataset, TrainError> {
    let template = match &config.data.template {
        Some(path) => Some(PromptTemplate::from_file(path).map_err(|e| TrainError::Data(e.to_string()))?),
        None => None,
    };
    load_dataset(&config.data.dataset, config.train.seed, template.as_ref()).map_err(|e| TrainError::Data(e.to_string()))
}

/// The narrow interface the round engine sees.
pub trait LocalTrainer {
    fn adapter(&self) -> &AdapterParams;
    /// Replaces the adapter (e.g. with the round's average); names and shapes
    /// must match this model's adapter.
    fn set_adapter(&mut self, params: AdapterParams) -> Result<(), TrainError>;
    /// Trains `steps` optimizer steps on `rows`; `step_offset` is the global
    /// step of the first one (the learning rate schedule follows it).
    fn train_steps(&mut self, rows: &[Row], steps: u64, step_offset: u64) -> Result<TrainReport, TrainError>;
    fn evaluate(&mut self, rows: &[Row]) -> Result<EvalReport, TrainError>;
}

/// Mean cross-entropy of the batch's counted targets.
pub fn batch_loss(decoder: &Decoder, adapter: &LoraApplier<'_>, batch: &Batch) -> Result<Array, ModelError> {
    let losses = token_losses(decoder, adapter, batch)?;
    Ok(match &batch.target_weights {
        None => losses.mean(None)?,
        // The count comes from the weights, an input of a compiled step,
        // never from a number that a trace would freeze.
        Some(weights) => losses.multiply(weights)?.sum(None)?.divide(weights.sum(None)?)?,
    })
}

/// Cross-entropy of each counted target, `[targets]`, in the order of
/// `batch.target_positions`. The output head (a vocabulary-wide matmul,
/// the largest single one) runs only at those positions, not at prompt
/// tokens the loss leaves out, nor at padding.
pub fn token_losses(decoder: &Decoder, adapter: &LoraApplier<'_>, batch: &Batch) -> Result<Array, ModelError> {
    let len = batch.tokens.shape()[1];
    let inputs = batch.tokens.take_axis(mlx_rs::ops::arange::<_, i32>(0, len - 1, None)?, 1)?;
    let layout = match &batch.packing {
        Some(rows) => Layout::Packed(rows),
        None => Layout::ROWS,
    };
    let hidden = decoder.hidden_states(&inputs, None, layout, Some(adapter))?;
    let width = hidden.shape()[2];
    let counted = hidden.reshape(&[-1, width])?.take_axis(&batch.target_positions, 0)?;
    target_losses(decoder, adapter, &counted, &batch.target_ids)
}

/// Cross-entropy of final hidden states `[targets, hidden]` against the
/// tokens they predict.
fn target_losses(decoder: &Decoder, adapter: &LoraApplier<'_>, counted: &Array, target_ids: &Array) -> Result<Array, ModelError> {
    let logits = decoder.logits(counted, Some(adapter))?.as_dtype(mlx_rs::Dtype::Float32)?;
    let log_norm = crate::model::softmax::logsumexp(&logits)?;
    let picked = logits.take_along_axis(target_ids.expand_dims(-1)?, -1)?.squeeze_axes(&[-1])?;
    Ok(log_norm.subtract(&picked)?)
}

/// Input positions a chunk of a one-row batch holds at least
/// (`chunk_count`): shorter chunks measured slower than the whole row.
const MIN_CHUNK_POSITIONS: i32 = 128;

/// Into how many chunks `chunked_token_losses` cuts `batch` with `streams`
/// streams: one (no chunking) unless it is one line, neither packed nor
/// padded, with at least `MIN_CHUNK_POSITIONS` inputs a chunk.
pub fn chunk_count(batch: &Batch, streams: usize) -> usize {
    let shape = batch.tokens.shape();
    if shape[0] != 1 || batch.packing.is_some() || batch.target_weights.is_some() {
        return 1;
    }
    streams.min(((shape[1] - 1) / MIN_CHUNK_POSITIONS).max(1) as usize)
}

/// `token_losses` of a one-line batch with its positions cut into
/// consecutive chunks, chunk `c` computed on `streams[c]` with
/// `adapters[c]` (`None`: the default stream): each chunk attends to the
/// earlier chunks' keys and values through a KV cache, as a decoder's
/// chunked prefill does, so the chunks compute what the whole line
/// computes. The output head runs over the targets in as many parts.
pub fn chunked_token_losses(decoder: &Decoder, adapters: &[LoraApplier<'_>], batch: &Batch, streams: &[Option<Stream>]) -> Result<Array, ModelError> {
    let inputs = batch.tokens.shape()[1] - 1;
    let chunks = adapters.len() as i32;
    let bounds = |total: i32, c: usize| (total * c as i32 / chunks, total * (c as i32 + 1) / chunks);
    let range = |(start, end): (i32, i32)| mlx_rs::ops::arange::<_, i32>(start, end, None);
    let mut caches = decoder.new_cache();
    let mut hidden = Vec::with_capacity(adapters.len());
    for (c, adapter) in adapters.iter().enumerate() {
        hidden.push(on_stream(streams.get(c).cloned().flatten(), || {
            let chunk = batch.tokens.take_axis(range(bounds(inputs, c))?, 1)?;
            decoder.hidden_states(&chunk, Some(&mut caches), Layout::ROWS, Some(adapter))
        })?);
    }
    let hidden = mlx_rs::ops::concatenate(&hidden, 1)?;
    let width = hidden.shape()[2];
    let counted = hidden.reshape(&[-1, width])?.take_axis(&batch.target_positions, 0)?;
    let targets = counted.shape()[0];
    let mut losses = Vec::with_capacity(adapters.len());
    for (c, adapter) in adapters.iter().enumerate() {
        losses.push(on_stream(streams.get(c).cloned().flatten(), || {
            let part = range(bounds(targets, c))?;
            target_losses(decoder, adapter, &counted.take_axis(&part, 0)?, &batch.target_ids.take_axis(&part, 0)?)
        })?);
    }
    Ok(mlx_rs::ops::concatenate(&losses, 0)?)
}

/// The MLX trainer: a frozen decoder, its tokenizer, and the adapter with
/// its optimizer state.
pub struct MlxTrainer {
    pub decoder: Decoder,
    pub tokenizer: Tokenizer,
    pub settings: LoraSettings,
    pub config: TrainConfig,
    pub schedule: Schedule,
    pub params: AdapterParams,
    pub optimizer: Optimizer,
    encoded: HashMap<u64, Encoded>,
    /// The adapted projections (their paths, sorted): each step draws a
    /// dropout key for each. The adapter's layout never changes.
    projections: Vec<String>,
    /// With `train.compile`, built at the first step.
    compiled: Option<CompiledStep>,
    /// With `train.compile` on the CPU, the step for a long one-row batch,
    /// cut into chunks on the lanes' streams (`chunk_count`).
    row_compiled: Option<CompiledStep>,
    /// The streams of parts 1.. of a split batch (`train.cpu_streams`;
    /// part 0 runs on the default stream), made when first needed.
    lanes: Vec<Lane>,
}

/// A gradient by adapter tensor name.
type Grads = HashMap<Rc<str>, Array>;

/// An MLX CPU stream (MLX runs each on a thread of its own) that computes
/// one part of every split batch, with its own compiled step: a trace
/// records the stream of each operation.
struct Lane {
    stream: Stream,
    compiled: Option<CompiledStep>,
}

impl MlxTrainer {
    /// A trainer with fresh adapters; `total_steps` spans the whole run (all
    /// rounds), for the learning-rate schedule.
    pub fn new(mut decoder: Decoder, tokenizer: Tokenizer, settings: LoraSettings, config: TrainConfig, total_steps: u64) -> Result<Self, TrainError> {
        let params = settings.init(&decoder, config.seed)?;
        settings.keep_base_norms(&mut decoder)?;
        Ok(Self {
            schedule: Schedule::from_config(&config, total_steps),
            optimizer: Optimizer::new(config.optimizer),
            decoder,
            tokenizer,
            settings,
            config,
            projections: lora::adapted_paths(&params),
            params,
            encoded: HashMap::new(),
            compiled: None,
            row_compiled: None,
            lanes: Vec::new(),
        })
    }

    fn encoded(&mut self, row: &Row) -> Result<&Encoded, TrainError> {
        if !self.encoded.contains_key(&row.index) {
            let encoded = encode(&self.tokenizer, row, self.config.max_seq_length as usize)?;
            self.encoded.insert(row.index, encoded);
        }
        Ok(&self.encoded[&row.index])
    }

    /// How `rows` are dealt into micro-batches: grouped by length when a
    /// batch holds several rows (`train.group_by_length`), which tokenizes
    /// every row first; otherwise a seeded shuffle (so one-row batches are
    /// what they always were).
    fn batch_order(&mut self, rows: &[Row]) -> Result<BatchOrder, TrainError> {
        let size = self.config.batch_size.max(1) as usize;
        if !self.config.group_by_length || size == 1 {
            return Ok(BatchOrder::shuffled(rows.len(), size));
        }
        Ok(BatchOrder::by_length(&self.token_counts(rows)?, size))
    }

    /// Each row's token count, tokenizing (and caching) rows seen first.
    fn token_counts(&mut self, rows: &[Row]) -> Result<Vec<usize>, TrainError> {
        rows.iter().map(|row| Ok(self.encoded(row)?.tokens.len())).collect()
    }

    /// The rows of global micro-batch `micro` (`step * accumulation + k`).
    fn batch_rows<'r>(&self, order: &BatchOrder, rows: &'r [Row], micro: u64) -> Vec<&'r Row> {
        order.batch(self.config.seed, micro).into_iter().map(|position| &rows[position]).collect()
    }

    /// A batch of `rows`; training batches are padded to `train.pad_to`.
    fn make_batch(&mut self, rows: &[&Row], training: bool) -> Result<Batch, TrainError> {
        let mut encoded = Vec::with_capacity(rows.len());
        for row in rows {
            encoded.push(self.encoded(row)?.clone());
        }
        let pad_to = if training { self.pad_to() } else { 1 };
        make_batch(&encoded.iter().collect::<Vec<_>>(), self.config.mask_prompt, self.config.pack, pad_to)
    }

    /// A training batch of `rows` as parts computed at once on their own
    /// streams: `part_count` of them, rows dealt in turn (so the parts hold
    /// about as many tokens each, the rows of a length-grouped batch being
    /// alike).
    fn make_parts(&mut self, rows: &[&Row]) -> Result<Vec<Batch>, TrainError> {
        let count = self.part_count(rows.len());
        self.add_lanes(count);
        let mut parts = Vec::with_capacity(count);
        for part in 0..count {
            let members: Vec<&Row> = rows.iter().skip(part).step_by(count).copied().collect();
            parts.push(self.make_batch(&members, true)?);
        }
        Ok(parts)
    }

    /// How many parts a batch of `rows` rows is split into: with the
    /// compiled step on the CPU `train.cpu_streams`, by default one per
    /// core, at most one per row; one on a GPU (its kernels already fill
    /// it). Op by op, one: MLX dispatches every small operation from the
    /// calling thread, which then bounds the step (two streams measured
    /// 10% slower than one), and evaluation runs op by op, so it stays one
    /// batch too.
    fn part_count(&self, rows: usize) -> usize {
        if !self.config.compile || crate::mlx_env::backend() != crate::mlx_env::Backend::Cpu {
            return 1;
        }
        let streams = match self.config.cpu_streams {
            Some(streams) => streams as usize,
            None => std::thread::available_parallelism().map_or(1, |cores| cores.get()),
        };
        streams.clamp(1, rows.max(1))
    }

    /// Lanes for `streams` streams in all (the default stream is one).
    fn add_lanes(&mut self, streams: usize) {
        while self.lanes.len() + 1 < streams {
            self.lanes.push(Lane {
                stream: Stream::new_with_device(&Device::cpu()),
                compiled: None,
            });
        }
    }

    /// The stream of part `part`: `None` (the default stream) for part 0.
    fn part_stream(&self, part: usize) -> Option<Stream> {
        part.checked_sub(1).and_then(|lane| self.lanes.get(lane)).map(|lane| lane.stream.clone())
    }

    /// `train.pad_to`, or by default 32 for a compiled step on a GPU (where
    /// a new trace costs more than padding) and none elsewhere.
    fn pad_to(&self) -> usize {
        match self.config.pad_to {
            Some(pad_to) => pad_to as usize,
            None if self.config.compile && crate::mlx_env::backend() != crate::mlx_env::Backend::Cpu => 32,
            None => 1,
        }
    }

    /// The adapter as evaluation applies it: no dropout.
    fn evaluation_applier(&self) -> LoraApplier<'_> {
        LoraApplier {
            params: &self.params,
            settings: &self.settings,
            dropout: None,
        }
    }

    /// The time of the forward pass alone (loss evaluated, no gradients) on
    /// the micro-batches `micros` of `rows`: what `bench train --profile`
    /// subtracts from the forward and backward passes to split them.
    pub fn time_forward(&mut self, rows: &[Row], micros: std::ops::Range<u64>) -> Result<Duration, TrainError> {
        let mut total = Duration::ZERO;
        let order = self.batch_order(rows)?;
        for micro in micros {
            let batch_rows = self.batch_rows(&order, rows, micro);
            let batch = self.make_batch(&batch_rows, true)?;
            let started = Instant::now();
            let loss = batch_loss(&self.decoder, &self.evaluation_applier(), &batch)?;
            let _blas = crate::mlx_env::BlasHold::new(false);
            loss.eval()?;
            total += started.elapsed();
        }
        Ok(total)
    }

    /// The batch shapes the compiled steps hold traces of.
    pub fn traced_shapes(&self) -> usize {
        let lanes = self.lanes.iter().filter_map(|lane| lane.compiled.as_ref());
        self.compiled.iter().chain(self.row_compiled.iter()).chain(lanes).map(CompiledStep::traced_shapes).sum()
    }

    /// Runs what a round runs once, on throwaway state, so that MLX traces
    /// the compiled step and builds its kernels (on a GPU, minutes of NVRTC
    /// on a fresh machine; kept on disk afterwards) before the first
    /// round's clock starts, not inside it: training steps on the batches
    /// of `train_rows` (on a GPU one of each batch shape an epoch holds,
    /// `trace_every_shape`; on the CPU, where a trace is cheap next to a
    /// step's matmuls, the first batch alone), the eval loss of one row of
    /// `eval_rows`, and two greedy tokens of a row of `generate_rows` (the
    /// decoding exact match uses). The adapter, the optimizer's state and
    /// the schedule are as they were.
    pub fn warm_up(&mut self, train_rows: &[Row], eval_rows: &[Row], generate_rows: &[Row]) -> Result<(), TrainError> {
        if crate::mlx_env::backend() == crate::mlx_env::Backend::Cpu {
            self.throwaway_steps(train_rows, &[0])?;
        } else {
            self.trace_every_shape(train_rows)?;
        }
        if let Some(row) = eval_rows.first() {
            self.evaluate(std::slice::from_ref(row))?;
        }
        let prompt = generate_rows.iter().find_map(|row| match &row.sample {
            crate::data::Sample::PromptCompletion { prompt, .. } => Some(prompt.clone()),
            _ => None,
        });
        if let Some(prompt) = prompt {
            let ids = self.tokenizer.encode_chat(&[crate::model::chat::ChatMessage::user(prompt)])?;
            let params = crate::model::generate::SamplingParams { max_tokens: 2, ..Default::default() };
            crate::model::generate::generate(&self.decoder, Some(&self.evaluation_applier()), &ids, &params, &[], true, |_| Ok(true))?;
        }
        Ok(())
    }

    /// One training step on the first batch of each shape in an epoch of
    /// `rows` (at most `MAX_WARM_SHAPES`), on throwaway state: the compiled
    /// step traces a shape once, and on a GPU a trace also builds kernels,
    /// so rows of mixed lengths (a batch shape per 32 tokens of length)
    /// would otherwise pay for a trace in each of the first steps that
    /// meets a new length. The adapter, the optimizer's state and the
    /// schedule are as they were. Returns how many shapes it ran.
    pub fn trace_every_shape(&mut self, rows: &[Row]) -> Result<usize, TrainError> {
        const MAX_WARM_SHAPES: usize = 64;
        if rows.is_empty() {
            return Err(TrainError::Data("no rows to train on".into()));
        }
        let order = self.batch_order(rows)?;
        let accumulation = u64::from(self.config.grad_accumulation_steps.max(1));
        let mut shapes = std::collections::HashSet::new();
        let mut first_steps = Vec::new();
        for micro in 0..order.batches_per_epoch() {
            let batch_rows = self.batch_rows(&order, rows, micro);
            let parts = self.make_parts(&batch_rows)?;
            let shape: Vec<step::ShapeKey> = parts.iter().map(step::shape_key).collect();
            if shapes.insert(shape) {
                first_steps.push(micro / accumulation);
                if first_steps.len() == MAX_WARM_SHAPES {
                    break;
                }
            }
        }
        self.throwaway_steps(rows, &first_steps)?;
        Ok(first_steps.len())
    }

    /// Training steps `steps` (one each) whose results are dropped: the
    /// adapter and the optimizer's state are as they were afterwards.
    fn throwaway_steps(&mut self, rows: &[Row], steps: &[u64]) -> Result<(), TrainError> {
        let saved = (self.params.clone(), std::mem::replace(&mut self.optimizer, Optimizer::new(self.config.optimizer)));
        let trained = steps.iter().try_for_each(|&step| self.train_steps(rows, 1, step).map(|_| ()));
        (self.params, self.optimizer) = saved;
        trained
    }

    /// Loss and gradients of one micro-batch (its parts), compiled or op by op.
    /// Also returns the streams it computed on.
    fn loss_and_grads(&mut self, parts: &[Batch], micro: u64) -> Result<(f32, Grads, usize), TrainError> {
        let mut dropouts = Vec::with_capacity(parts.len());
        for part in 0..parts.len() {
            dropouts.push(Dropout::for_step(self.settings.dropout, self.config.seed, micro, part, self.projections.iter().map(String::as_str))?);
        }
        if self.config.compile {
            match self.compiled_loss_and_grads(parts, &dropouts) {
                Ok(result) => return Ok(result),
                // A compiled step can fail where the op-by-op one does not
                // (MLX builds its fused kernels at run time, with the
                // system's C++ compiler or NVRTC): go on op by op.
                Err(err) => {
                    tracing::warn!(error = %err, "the compiled training step failed; training op by op from here (set train.compile = false to skip it)");
                    self.config.compile = false;
                    self.compiled = None;
                    self.row_compiled = None;
                    for lane in &mut self.lanes {
                        lane.compiled = None;
                    }
                }
            }
        }
        let mut outputs = Vec::with_capacity(parts.len());
        for (part, (batch, dropout)) in parts.iter().zip(&dropouts).enumerate() {
            let (decoder, settings) = (&self.decoder, &self.settings);
            let loss_fn = |params: Grads, batch: Batch| -> Result<Vec<Array>, Exception> {
                let applier = LoraApplier {
                    params: &params,
                    settings,
                    dropout: Some(dropout),
                };
                batch_loss(decoder, &applier, &batch)
                    .map(|loss| vec![loss])
                    .map_err(|e| Exception::custom(e.to_string()))
            };
            let (values, grads) = on_stream(self.part_stream(part), || {
                mlx_rs::transforms::keyed_value_and_grad(loss_fn)(self.params.clone(), batch.clone())
            })?;
            let loss = values.into_iter().next().ok_or_else(|| TrainError::Adapter("the loss function returned nothing".into()))?;
            outputs.push((loss, grads));
        }
        // Parts only when a compiled step failed mid-batch.
        let (loss, grads) = combined(parts, outputs, parts.len())?;
        Ok((loss, grads, parts.len()))
    }

    fn compiled_loss_and_grads(&mut self, parts: &[Batch], dropouts: &[Dropout]) -> Result<(f32, Grads, usize), TrainError> {
        if let ([batch], [dropout]) = (parts, dropouts) {
            let streams = self.part_count(usize::MAX);
            let chunks = chunk_count(batch, streams);
            if chunks > 1 {
                // Every stream, so that the step chunks as `chunks` says
                // whatever row length it first saw.
                self.add_lanes(streams);
                let compiled = match &mut self.row_compiled {
                    Some(compiled) => compiled,
                    None => {
                        let streams = self.lanes.iter().map(|lane| lane.stream.clone()).collect();
                        self.row_compiled.insert(CompiledStep::new(&self.decoder, &self.settings, &self.params, self.optimizer.kind).chunking_rows(streams))
                    }
                };
                let output = compiled.loss_and_grads(&self.params, batch, dropout)?;
                let (loss, grads) = combined(parts, vec![output], chunks)?;
                return Ok((loss, grads, chunks));
            }
        }
        let mut outputs = Vec::with_capacity(parts.len());
        for (part, (batch, dropout)) in parts.iter().zip(dropouts).enumerate() {
            let stream = self.part_stream(part);
            let slot = match part.checked_sub(1) {
                None => &mut self.compiled,
                Some(lane) => &mut self.lanes[lane].compiled,
            };
            let compiled = match slot {
                Some(compiled) => compiled,
                None => slot.insert(CompiledStep::new(&self.decoder, &self.settings, &self.params, self.optimizer.kind)),
            };
            outputs.push(on_stream(stream, || compiled.loss_and_grads(&self.params, batch, dropout))?);
        }
        let (loss, grads) = combined(parts, outputs, parts.len())?;
        Ok((loss, grads, parts.len()))
    }
}

fn non_finite_loss(loss: f32, step: u64) -> TrainError {
    TrainError::Data(format!("the loss became {loss} at step {step}; lower train.learning_rate"))
}

/// Runs `build` with `stream` as the default stream for the operations it
/// makes (`None`: the default stream stays).
pub(crate) fn on_stream<T>(stream: Option<Stream>, build: impl FnOnce() -> T) -> T {
    match stream {
        Some(stream) => mlx_rs::with_stream(&stream, build),
        None => build(),
    }
}

/// The loss and gradients of a batch from its parts' (each a mean over
/// its own targets, weighted here by its share of the batch's targets),
/// evaluated together so that the parts' streams compute at once (`streams`
/// of them: BLAS runs single-threaded when there are several). One part is
/// returned as it is.
fn combined(parts: &[Batch], outputs: Vec<(Array, Grads)>, streams: usize) -> Result<(f32, Grads), TrainError> {
    let targets: usize = parts.iter().map(|batch| batch.target_tokens).sum();
    let mut total: Option<(Array, Grads)> = None;
    for (batch, (loss, grads)) in parts.iter().zip(outputs) {
        let (loss, grads) = if parts.len() == 1 {
            (loss, grads)
        } else {
            let share = Array::from_f32(batch.target_tokens as f32 / targets.max(1) as f32);
            let mut weighted = Grads::with_capacity(grads.len());
            for (name, grad) in grads {
                weighted.insert(name, grad.multiply(&share)?);
            }
            (loss.multiply(&share)?, weighted)
        };
        total = Some(match total {
            None => (loss, grads),
            Some((loss_sum, mut grad_sum)) => {
                add_grads(&mut grad_sum, grads)?;
                (loss_sum.add(&loss)?, grad_sum)
            }
        });
    }
    let (loss, grads) = total.ok_or_else(|| TrainError::Data("an empty batch".into()))?;
    let _blas = crate::mlx_env::BlasHold::new(streams > 1);
    mlx_rs::transforms::eval(grads.values().chain(std::iter::once(&loss)))?;
    Ok((loss.try_item_cast::<f32>()?, grads))
}

/// Adds `grads` into `total`, tensor by tensor.
fn add_grads(total: &mut Grads, grads: Grads) -> Result<(), Exception> {
    for (name, grad) in grads {
        let sum = match total.remove(&name) {
            Some(previous) => previous.add(&grad)?,
            None => grad,
        };
        total.insert(name, sum);
    }
    Ok(())
}

impl MlxTrainer {
    /// `train_steps`, which waits for what is still queued when this fails.
    fn run_steps(&mut self, rows: &[Row], steps: u64, step_offset: u64) -> Result<TrainReport, TrainError> {
        if rows.is_empty() {
            return Err(TrainError::Data("no rows to train on".into()));
        }
        let started = Instant::now();
        let accumulation = u64::from(self.config.grad_accumulation_steps.max(1));
        let mut report = TrainReport::default();
        let mut loss_sum = 0.0f64;
        let order = self.batch_order(rows)?;
        // A whole step queued on a GPU while the host builds the next one.
        let mut in_flight: Option<InFlightStep> = None;
        // On the CPU (`train.pipeline` asked for there), BLAS's thread count
        // is held while steps compute after their `async_eval` returned
        // (`BlasHold`): until the last one queued has finished.
        let mut blas_held: Option<crate::mlx_env::BlasHold> = None;
        for step in step_offset..step_offset + steps {
            let learning_rate = self.schedule.learning_rate(step);
            let mut summed: Option<HashMap<Rc<str>, Array>> = None;
            for k in 0..accumulation {
                let micro = step * accumulation + k;
                let phase = Instant::now();
                let batch_rows = self.batch_rows(&order, rows, micro);
                let parts = self.make_parts(&batch_rows)?;
                report.phases.data += phase.elapsed();
                report.examples += batch_rows.len() as u64;
                for batch in &parts {
                    report.tokens += batch.target_tokens as u64;
                    report.processed_tokens += batch.real_tokens as u64;
                    report.computed_tokens += batch.tokens.shape().iter().map(|&d| d as u64).product::<u64>();
                }
                let phase = Instant::now();
                if accumulation == 1
                    && self.pipelined()
                    && let Some(queued) = self.whole_step(&parts, step, learning_rate)?
                {
                    report.streams = report.streams.max(1);
                    if blas_held.is_none() && crate::mlx_env::backend() == crate::mlx_env::Backend::Cpu {
                        blas_held = Some(crate::mlx_env::BlasHold::new(false));
                    }
                    mlx_rs::transforms::async_eval(self.params.values().chain(self.optimizer.state.values()).chain(std::iter::once(&queued.loss)))?;
                    report.phases.queuing += phase.elapsed();
                    let wait = Instant::now();
                    if let Some(previous) = in_flight.replace(queued) {
                        loss_sum += f64::from(self.finish(previous)?);
                    }
                    report.phases.waiting += wait.elapsed();
                    report.phases.forward_backward += phase.elapsed();
                    continue;
                }
                if let Some(previous) = in_flight.take() {
                    loss_sum += f64::from(self.finish(previous)?);
                    report.phases.waiting += phase.elapsed();
                }
                // The step in turn holds BLAS for its own evaluation.
                blas_held = None;
                let (loss, grads, streams) = self.loss_and_grads(&parts, micro)?;
                report.phases.forward_backward += phase.elapsed();
                let phase = Instant::now();
                if !loss.is_finite() {
                    return Err(non_finite_loss(loss, step));
                }
                loss_sum += f64::from(loss) / accumulation as f64;
                report.streams = report.streams.max(streams as u32);
                summed = Some(match summed {
                    None => grads,
                    Some(mut total) => {
                        add_grads(&mut total, grads)?;
                        total
                    }
                });
                report.phases.optimizer += phase.elapsed();
            }
            report.last_learning_rate = learning_rate;
            report.steps += 1;
            let Some(mut grads) = summed else { continue };
            let phase = Instant::now();
            if accumulation > 1 {
                let scale = Array::from_f32(1.0 / accumulation as f32);
                for grad in grads.values_mut() {
                    *grad = grad.multiply(&scale)?;
                }
            }
            match self.compiled.as_mut().or(self.row_compiled.as_mut()) {
                Some(compiled) => compiled.apply_update(&mut self.optimizer, &mut self.params, &grads, learning_rate)?,
                None => self.optimizer.step(&mut self.params, &grads, learning_rate)?,
            }
            mlx_rs::transforms::eval(self.params.values().chain(self.optimizer.state.values()))?;
            report.phases.optimizer += phase.elapsed();
        }
        if let Some(last) = in_flight.take() {
            let phase = Instant::now();
            loss_sum += f64::from(self.finish(last)?);
            report.phases.waiting += phase.elapsed();
            report.phases.forward_backward += phase.elapsed();
        }
        drop(blas_held);
        report.loss = (loss_sum / report.steps.max(1) as f64) as f32;
        report.elapsed = started.elapsed();
        Ok(report)
    }
}

impl LocalTrainer for MlxTrainer {
    fn adapter(&self) -> &AdapterParams {
        &self.params
    }

    fn set_adapter(&mut self, params: AdapterParams) -> Result<(), TrainError> {
        adapters::check_compatible(&self.params, &params)?;
        self.params = params;
        Ok(())
    }

    fn train_steps(&mut self, rows: &[Row], steps: u64, step_offset: u64) -> Result<TrainReport, TrainError> {
        let trained = self.run_steps(rows, steps, step_offset);
        if trained.is_err() && self.pipelined() {
            // Nothing may still compute once this returns: a step queued
            // after the one that failed may be (`mlx_env::wait_for_queued_work`).
            crate::mlx_env::wait_for_queued_work().map_err(TrainError::Io)?;
        }
        trained
    }

    fn evaluate(&mut self, rows: &[Row]) -> Result<EvalReport, TrainError> {
        let mut weighted = 0.0f64;
        let mut tokens = 0u64;
        let size = self.config.batch_size.max(1) as usize;
        // The loss is a mean over every row's targets, whatever the batches:
        // rows of similar length together only save padding.
        let mut ordered: Vec<&Row> = rows.iter().collect();
        if self.config.group_by_length && size > 1 {
            let counts = self.token_counts(rows)?;
            let mut positions: Vec<usize> = (0..rows.len()).collect();
            positions.sort_by_key(|&p| counts[p]);
            ordered = positions.into_iter().map(|p| &rows[p]).collect();
        }
        for chunk in ordered.chunks(size) {
            let batch = self.make_batch(chunk, false)?;
            let loss = batch_loss(&self.decoder, &self.evaluation_applier(), &batch)?;
            let _blas = crate::mlx_env::BlasHold::new(false);
            weighted += f64::from(loss.try_item_cast::<f32>()?) * batch.target_tokens as f64;
            tokens += batch.target_tokens as u64;
        }
        Ok(EvalReport {
            loss: if tokens == 0 { 0.0 } else { (weighted / tokens as f64) as f32 },
            tokens,
        })
    }
}
