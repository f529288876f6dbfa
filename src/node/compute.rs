//! The compute thread: one MLX trainer (one loaded base model) serving any
//! number of nodes. Each node (a slot) keeps only its adapter and optimizer
//! state here; they are swapped in for its job and out again. The round
//! engines talk to it through [`ComputeClient`], which implements
//! [`RoundTrainer`]; adapters cross as float tensors, MLX arrays never leave
//! this thread.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use mlx_rs::Array;
use tokio::sync::{oneshot, watch};

use super::engine::{LocalResult, RoundTrainer};
use crate::aggregate::{Tensor, Tensors};
use crate::config::Config;
use crate::model::thread::ModelThread;
use crate::model::{LoadOptions, QuantMode, load_model};
use crate::train::lora::LoraSettings;
use crate::data::{Dataset, Row};
use crate::train::lora::AdapterParams;
use crate::train::metrics::exact_match_rate;
use crate::train::optim::Optimizer;
use crate::train::schedule::Schedule;
use crate::train::{LocalTrainer, MlxTrainer, TrainError, adapters};

type Reply<T> = oneshot::Sender<Result<T, String>>;

enum Job {
    Initial(Reply<Tensors>),
    Train {
        slot: u64,
        start: Tensors,
        rows: Vec<u64>,
        round: u64,
        reply: Reply<(Tensors, LocalResult)>,
    },
    Evaluate(Tensors, Reply<f32>),
    ExactMatch(Option<Tensors>, Reply<f32>),
    Save(Tensors, PathBuf, Reply<()>),
    /// A node crashed: its optimizer state is gone with it.
    Forget(u64),
    /// A node's optimizer state, for its checkpoint.
    OptimizerState(u64, Reply<Tensors>),
    /// A node's checkpointed optimizer state, back in place.
    RestoreOptimizer(u64, Tensors, Reply<()>),
    /// `steps` steps from the initial adapter on every training row: the
    /// centralized baseline a federated run is compared with.
    Centralized(u64, Reply<Tensors>),
    /// Free everything MLX holds and end the thread.
    Shutdown,
}

/// The running compute thread and what it loaded.
pub struct Prepared {
    pub client: ComputeClient,
    /// blake3 of the base model's files.
    pub model_identity: String,
    pub fingerprint: String,
    pub train_rows: Vec<u64>,
    /// How long the warm-up before round 0 took (`MlxTrainer::warm_up`),
    /// or why it failed (the same work then fails in the round, with the
    /// round's error).
    pub warm_up: Result<Duration, String>,
}

/// What the thread evaluates on, and how long a round is.
#[derive(Debug, Clone)]
pub struct ComputeSettings {
    pub local_steps: u64,
    /// Held-out rows for the eval loss.
    pub eval_rows: usize,
    /// Test rows for exact match (built-in task only).
    pub exact_match_rows: usize,
}

/// The handle side: cheap to clone, one per node (slot).
#[derive(Clone)]
pub struct ComputeClient {
    slot: u64,
    jobs: std_mpsc::Sender<Job>,
    busy: Arc<watch::Sender<usize>>,
    thread: ModelThread,
}

/// Starts the thread. `load` runs on it and builds the trainer (the model
/// is loaded there, so MLX state never crosses threads).
pub fn spawn(
    load: impl FnOnce() -> Result<(MlxTrainer, Dataset, String), TrainError> + Send + 'static,
    settings: ComputeSettings,
) -> Result<Prepared, String> {
    let (jobs, receiver) = std_mpsc::channel::<Job>();
    let busy = Arc::new(watch::Sender::new(0usize));
    let (ready_tx, ready_rx) = std_mpsc::channel();
    let busy_thread = busy.clone();
    let thread = std::thread::Builder::new()
        .name("mlx-compute".into())
        .spawn(move || {
            let mut worker = match load() {
                Ok((mut trainer, dataset, identity)) => {
                    let warmed = warm_up(&mut trainer, &dataset, &settings);
                    let rows = dataset.train.iter().map(|r| r.index).collect::<Vec<_>>();
                    let _ = ready_tx.send(Ok((identity, dataset.fingerprint.clone(), rows, warmed)));
                    Worker::new(trainer, dataset, settings)
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            // Ends on Shutdown, or when every client is dropped.
            while let Ok(job) = receiver.recv() {
                if matches!(job, Job::Shutdown) {
                    break;
                }
                worker.run(job);
                busy_thread.send_modify(|n| *n = n.saturating_sub(1));
            }
            drop(worker);
        })
        .map_err(|e| format!("cannot start the compute thread: {e}"))?;
    let (model_identity, fingerprint, train_rows, warm_up) = ready_rx.recv().map_err(|_| "the compute thread stopped while loading".to_owned())??;
    Ok(Prepared {
        client: ComputeClient {
            slot: 0,
            jobs,
            busy,
            thread: ModelThread::new(thread, "compute"),
        },
        model_identity,
        fingerprint,
        train_rows,
        warm_up,
    })
}

/// Builds the kernels a round uses before the first round starts
/// (`MlxTrainer::warm_up`): how long it took, or why it failed.
fn warm_up(trainer: &mut MlxTrainer, dataset: &Dataset, settings: &ComputeSettings) -> Result<Duration, String> {
    let started = std::time::Instant::now();
    let generate_rows = if settings.exact_match_rows > 0 { &dataset.test[..] } else { &[] };
    trainer.warm_up(&dataset.train, &dataset.valid, generate_rows).map_err(|e| e.to_string())?;
    Ok(started.elapsed())
}

/// The compute thread for the configured model, data and LoRA settings;
/// `total_steps` spans the run (the learning-rate schedule).
pub fn spawn_for_config(config: &Config, quant: QuantMode, settings: ComputeSettings, total_steps: u64) -> Result<Prepared, String> {
    let config = config.clone();
    let load = move || -> Result<(MlxTrainer, Dataset, String), TrainError> {
        let dataset = crate::train::load_data(&config)?;
        let loaded = load_model(&config.model.source, &LoadOptions { quant })?;
        let lora = LoraSettings::from_config(&config.lora);
        let trainer = MlxTrainer::new(loaded.decoder, loaded.tokenizer, lora, config.train.clone(), total_steps)?;
        Ok((trainer, dataset, loaded.identity))
    };
    spawn(load, settings)
}

impl ComputeClient {
    /// The client of another node sharing this thread.
    pub fn for_slot(&self, slot: u64) -> Self {
        Self { slot, ..self.clone() }
    }

    /// Jobs queued or running, for [`RoundClock::ComputeIdle`](super::engine::RoundClock).
    pub fn busy(&self) -> watch::Receiver<usize> {
        self.busy.subscribe()
    }

    /// Queues a job, counting it as busy until the thread has run it;
    /// false if the thread has stopped.
    fn enqueue(&self, job: Job) -> bool {
        self.busy.send_modify(|n| *n += 1);
        let sent = self.jobs.send(job).is_ok();
        if !sent {
            self.busy.send_modify(|n| *n = n.saturating_sub(1));
        }
        sent
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Job) -> Result<T, String> {
        let (tx, rx) = oneshot::channel();
        if !self.enqueue(make(tx)) {
            return Err("the compute thread stopped".into());
        }
        rx.await.map_err(|_| "the compute thread stopped".to_owned())?
    }

    /// Exact match on the test rows, with `adapter` or the base model.
    pub async fn exact_match(&self, adapter: Option<Tensors>) -> Result<f32, String> {
        self.ask(|reply| Job::ExactMatch(adapter, reply)).await
    }

    /// Trains a fresh adapter for `steps` steps on every training row.
    pub async fn centralized(&self, steps: u64) -> Result<Tensors, String> {
        self.ask(|reply| Job::Centralized(steps, reply)).await
    }

    /// Ends the thread and waits until MLX has freed everything it held
    /// (before the process exits: see `model::thread`).
    pub fn shutdown(&self) {
        let _ = self.jobs.send(Job::Shutdown);
        self.thread.join();
    }

    pub fn forget(&self) {
        // A stopped thread has nothing left to forget.
        let _ = self.enqueue(Job::Forget(self.slot));
    }
}

impl RoundTrainer for ComputeClient {
    async fn initial(&self) -> Result<Tensors, String> {
        self.ask(Job::Initial).await
    }

    async fn train(&self, start: Tensors, rows: Vec<u64>, round: u64) -> Result<(Tensors, LocalResult), String> {
        let slot = self.slot;
        self.ask(|reply| Job::Train { slot, start, rows, round, reply }).await
    }

    async fn evaluate(&self, adapter: Tensors) -> Result<f32, String> {
        self.ask(|reply| Job::Evaluate(adapter, reply)).await
    }

    async fn save(&self, adapter: Tensors, dir: PathBuf) -> Result<(), String> {
        self.ask(|reply| Job::Save(adapter, dir, reply)).await
    }

    async fn optimizer_state(&self) -> Result<Tensors, String> {
        let slot = self.slot;
        self.ask(|reply| Job::OptimizerState(slot, reply)).await
    }

    async fn restore_optimizer_state(&self, state: Tensors) -> Result<(), String> {
        let slot = self.slot;
        self.ask(|reply| Job::RestoreOptimizer(slot, state, reply)).await
    }
}

fn to_tensors(params: &AdapterParams) -> Result<Tensors, TrainError> {
    params
        .iter()
        .map(|(name, array)| {
            let array = array.as_dtype(mlx_rs::Dtype::Float32)?;
            array.eval()?;
            let values = array.try_as_slice::<f32>().map_err(|e| TrainError::Adapter(format!("{name}: {e}")))?.to_vec();
            let shape = array.shape().iter().map(|&d| d as usize).collect();
            Ok((name.to_string(), Tensor { shape, values }))
        })
        .collect()
}

fn to_params(tensors: &Tensors) -> AdapterParams {
    tensors
        .iter()
        .map(|(name, t)| {
            let shape: Vec<i32> = t.shape.iter().map(|&d| d as i32).collect();
            (name.as_str().into(), Array::from_slice(&t.values, &shape))
        })
        .collect()
}

struct Worker {
    trainer: MlxTrainer,
    initial: AdapterParams,
    rows: HashMap<u64, Row>,
    eval_rows: Vec<Row>,
    exact_rows: Vec<Row>,
    /// Each node's optimizer state between its jobs.
    optimizers: HashMap<u64, Optimizer>,
    settings: ComputeSettings,
}

impl Worker {
    fn new(trainer: MlxTrainer, dataset: Dataset, settings: ComputeSettings) -> Self {
        let eval_rows = dataset.valid.iter().take(settings.eval_rows).cloned().collect();
        let exact_rows = dataset.test.iter().take(settings.exact_match_rows).cloned().collect();
        Self {
            initial: trainer.params.clone(),
            rows: dataset.train.into_iter().map(|row| (row.index, row)).collect(),
            eval_rows,
            exact_rows,
            optimizers: HashMap::new(),
            trainer,
            settings,
        }
    }

    fn run(&mut self, job: Job) {
        let text = |e: TrainError| e.to_string();
        match job {
            Job::Initial(reply) => {
                let _ = reply.send(to_tensors(&self.initial).map_err(text));
            }
            Job::Train { slot, start, rows, round, reply } => {
                let _ = reply.send(self.train(slot, &start, &rows, round).map_err(text));
            }
            Job::Evaluate(adapter, reply) => {
                let rows = self.eval_rows.clone();
                let _ = reply.send(self.with_adapter(&adapter, |t| t.evaluate(&rows).map(|r| r.loss)).map_err(text));
            }
            Job::ExactMatch(adapter, reply) => {
                let rows = &self.exact_rows;
                let result = match adapter {
                    Some(adapter) => {
                        let params = to_params(&adapter);
                        exact_match_rate(&self.trainer.decoder, &self.trainer.tokenizer, Some((&params, &self.trainer.settings)), rows)
                    }
                    None => exact_match_rate(&self.trainer.decoder, &self.trainer.tokenizer, None, rows),
                };
                let _ = reply.send(result.map_err(text));
            }
            Job::Save(adapter, dir, reply) => {
                let _ = reply.send(adapters::save(&dir, &to_params(&adapter), &self.trainer.settings).map_err(text));
            }
            Job::Forget(slot) => {
                self.optimizers.remove(&slot);
            }
            Job::OptimizerState(slot, reply) => {
                let state = self.optimizers.get(&slot).map_or_else(|| Ok(Tensors::new()), |o| to_tensors(&o.state));
                let _ = reply.send(state.map_err(text));
            }
            Job::RestoreOptimizer(slot, state, reply) => {
                let mut optimizer = Optimizer::new(self.trainer.config.optimizer);
                optimizer.state = to_params(&state);
                self.optimizers.insert(slot, optimizer);
                let _ = reply.send(Ok(()));
            }
            Job::Centralized(steps, reply) => {
                let _ = reply.send(self.centralized(steps).map_err(text));
            }
            Job::Shutdown => {}
        }
    }

    /// Runs `work` with `adapter` in the trainer, then puts the previous one back.
    fn with_adapter<R>(&mut self, adapter: &Tensors, work: impl FnOnce(&mut MlxTrainer) -> Result<R, TrainError>) -> Result<R, TrainError> {
        let previous = self.trainer.params.clone();
        let result = self.trainer.set_adapter(to_params(adapter)).and_then(|()| work(&mut self.trainer));
        self.trainer.params = previous;
        result
    }

    fn centralized(&mut self, steps: u64) -> Result<Tensors, TrainError> {
        let mut rows: Vec<Row> = self.rows.values().cloned().collect();
        rows.sort_by_key(|r| r.index);
        let kind = self.trainer.config.optimizer;
        let optimizer = std::mem::replace(&mut self.trainer.optimizer, Optimizer::new(kind));
        let schedule = std::mem::replace(&mut self.trainer.schedule, Schedule::from_config(&self.trainer.config, steps));
        let initial = to_tensors(&self.initial)?;
        let outcome = self.with_adapter(&initial, |trainer| {
            trainer.train_steps(&rows, steps, 0)?;
            to_tensors(&trainer.params)
        });
        self.trainer.optimizer = optimizer;
        self.trainer.schedule = schedule;
        outcome
    }

    fn train(&mut self, slot: u64, start: &Tensors, indices: &[u64], round: u64) -> Result<(Tensors, LocalResult), TrainError> {
        let rows: Vec<Row> = indices
            .iter()
            .map(|i| self.rows.get(i).cloned().ok_or_else(|| TrainError::Data(format!("row {i} is not a training row"))))
            .collect::<Result<_, _>>()?;
        let kind = self.trainer.config.optimizer;
        let optimizer = self.optimizers.remove(&slot).unwrap_or_else(|| Optimizer::new(kind));
        self.trainer.optimizer = optimizer;
        let steps = self.settings.local_steps;
        let outcome = self.with_adapter(start, |trainer| {
            let report = trainer.train_steps(&rows, steps, round * steps)?;
            Ok((to_tensors(&trainer.params)?, report))
        });
        self.optimizers.insert(slot, std::mem::replace(&mut self.trainer.optimizer, Optimizer::new(kind)));
        let (tensors, report) = outcome?;
        Ok((
            tensors,
            LocalResult {
                loss: report.loss,
                examples: report.examples,
                tokens: report.tokens,
            },
        ))
    }
}
