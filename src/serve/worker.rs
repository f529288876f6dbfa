//! The model thread of `serve`: MLX arrays never leave it. Requests are
//! served one at a time in arrival order; at most `queue` wait (the HTTP
//! side answers 429 beyond that). An adapter swap is a job like a request:
//! the request being generated finishes on the old adapter, the next one
//! gets the new one, and nothing is dropped.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, RwLock};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use super::api::Usage;
use crate::model::chat::ChatMessage;
use crate::model::generate::{SamplingParams, generate};
use crate::model::linear::ProjectionAdapter;
use crate::model::thread::ModelThread;
use crate::model::{LoadOptions, LoadedModel, QuantMode, load_model};
use crate::train::adapters;
use crate::train::lora::{AdapterParams, LoraApplier, LoraSettings};

/// The adapter in use, as `/v1/models` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AdapterInfo {
    pub path: String,
    /// The averaged adapter's hash (the network's name for it) when known.
    pub hash: Option<String>,
    /// The training round it comes from, under `--follow`.
    pub round: Option<u64>,
}

pub enum Prompt {
    Chat(Vec<ChatMessage>),
    Text(String),
}

/// What a request streams back.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Text(String),
    Done { finish_reason: &'static str, usage: Usage },
    Failed(String),
}

enum Job {
    Generate {
        prompt: Prompt,
        params: SamplingParams,
        stop: Vec<String>,
        pieces: mpsc::Sender<Piece>,
    },
    Swap {
        dir: PathBuf,
        info: AdapterInfo,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Shutdown,
}

/// The HTTP side's handle on the model thread.
#[derive(Clone)]
pub struct ModelWorker {
    jobs: std_mpsc::Sender<Job>,
    waiting: Arc<AtomicUsize>,
    queue: usize,
    pub adapter: Arc<RwLock<Option<AdapterInfo>>>,
    thread: ModelThread,
}

#[derive(Debug, PartialEq)]
pub enum SubmitError {
    /// `queue` requests already wait.
    Busy(usize),
    Stopped,
}

impl ModelWorker {
    /// Loads the model (and adapter) on a new thread.
    pub fn spawn(source: String, quant: QuantMode, adapter: Option<PathBuf>, queue: usize) -> Result<Self, String> {
        let (jobs, receiver) = std_mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = std_mpsc::channel();
        let shown: Arc<RwLock<Option<AdapterInfo>>> = Arc::new(RwLock::new(None));
        let shown_thread = shown.clone();
        let waiting = Arc::new(AtomicUsize::new(0));
        let waiting_thread = waiting.clone();
        let thread = std::thread::Builder::new()
            .name("mlx-serve".into())
            .spawn(move || {
                let loaded = match load_model(&source, &LoadOptions { quant }) {
                    Ok(loaded) => loaded,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("cannot load model {source}: {e}")));
                        return;
                    }
                };
                let mut state = State { loaded, adapter: None, shown: shown_thread };
                if let Some(dir) = adapter {
                    let info = AdapterInfo {
                        path: dir.display().to_string(),
                        ..AdapterInfo::default()
                    };
                    if let Err(e) = state.swap(&dir, info) {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                }
                let _ = ready_tx.send(Ok(()));
                // Ends on Shutdown, or when every handle is gone.
                while let Ok(job) = receiver.recv() {
                    match job {
                        Job::Generate { prompt, params, stop, pieces } => {
                            let last = state.generate(prompt, &params, &stop, &pieces);
                            // Free the slot before the client hears the end:
                            // its next request must find it free.
                            waiting_thread.fetch_sub(1, Ordering::SeqCst);
                            let _ = pieces.blocking_send(last);
                        }
                        Job::Swap { dir, info, reply } => {
                            let _ = reply.send(state.swap(&dir, info));
                        }
                        Job::Shutdown => break,
                    }
                }
                drop(state);
            })
            .map_err(|e| format!("cannot start the model thread: {e}"))?;
        ready_rx.recv().map_err(|_| "the model thread stopped while loading".to_owned())??;
        Ok(Self {
            jobs,
            waiting,
            queue,
            adapter: shown,
            thread: ModelThread::new(thread, "model"),
        })
    }

    /// Queues a request; its text arrives on the returned channel.
    pub fn submit(&self, prompt: Prompt, params: SamplingParams, stop: Vec<String>) -> Result<mpsc::Receiver<Piece>, SubmitError> {
        // The one being generated counts too: `queue` is what may wait.
        if self.waiting.fetch_add(1, Ordering::SeqCst) > self.queue {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Busy(self.queue));
        }
        let (pieces, rx) = mpsc::channel(256);
        if self.jobs.send(Job::Generate { prompt, params, stop, pieces }).is_err() {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Stopped);
        }
        Ok(rx)
    }

    /// Switches to the adapter in `dir` between two requests.
    pub async fn swap(&self, dir: PathBuf, info: AdapterInfo) -> Result<(), String> {
        let (reply, answer) = oneshot::channel();
        self.jobs.send(Job::Swap { dir, info, reply }).map_err(|_| "the model thread stopped".to_owned())?;
        answer.await.map_err(|_| "the model thread stopped".to_owned())?
    }

    /// Ends the model thread and waits until MLX has freed what it held
    /// (before the process exits: see `model::thread`).
    pub fn shutdown(&self) {
        let _ = self.jobs.send(Job::Shutdown);
        self.thread.join();
    }
}

struct State {
    loaded: LoadedModel,
    adapter: Option<(AdapterParams, LoraSettings)>,
    shown: Arc<RwLock<Option<AdapterInfo>>>,
}

/// Where the text can be sent up to without cutting into a stop string
/// that may still complete: the end, less the longest stop string but one
/// byte, on a character boundary.
fn safe_end(text: &str, from: usize, longest_stop: usize) -> usize {
    let mut end = text.len().saturating_sub(longest_stop.saturating_sub(1)).max(from);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    end.max(from)
}

impl State {
    fn swap(&mut self, dir: &std::path::Path, info: AdapterInfo) -> Result<(), String> {
        let adapter = adapters::load(dir, &self.loaded.decoder).map_err(|e| format!("cannot load adapter {}: {e}", dir.display()))?;
        adapter.1.keep_base_norms(&mut self.loaded.decoder).map_err(|e| format!("adapter {}: {e}", dir.display()))?;
        self.adapter = Some(adapter);
        tracing::info!(path = %info.path, hash = ?info.hash, round = ?info.round, "serving adapter");
        if let Ok(mut shown) = self.shown.write() {
            *shown = Some(info);
        }
        Ok(())
    }

    /// Streams the text to `pieces` and returns the last piece (done or failed).
    fn generate(&self, prompt: Prompt, params: &SamplingParams, stop: &[String], pieces: &mpsc::Sender<Piece>) -> Piece {
        let tokenizer = &self.loaded.tokenizer;
        let ids = match prompt {
            Prompt::Chat(messages) => tokenizer.encode_chat(&messages),
            Prompt::Text(text) => tokenizer.encode(&text, true),
        };
        let ids = match ids {
            Ok(ids) if !ids.is_empty() => ids,
            Ok(_) => return Piece::Failed("the prompt has no tokens".into()),
            Err(e) => return Piece::Failed(e.to_string()),
        };
        let applier = self.adapter.as_ref().map(|(params, settings)| LoraApplier {
            params,
            settings,
            dropout: None,
        });
        let hook = applier.as_ref().map(|a| a as &dyn ProjectionAdapter);
        let longest_stop = stop.iter().map(String::len).max().unwrap_or(0);
        let mut decoder = tokenizer.stream_decoder();
        let (mut text, mut sent) = (String::new(), 0usize);
        let mut stopped = false;
        let result = generate(&self.loaded.decoder, hook, &ids, params, tokenizer.eos_ids(), true, |token| {
            text.push_str(&decoder.push(token)?);
            let (end, go_on) = match stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                Some(at) => {
                    stopped = true;
                    (at, false)
                }
                None => (safe_end(&text, sent, longest_stop), true),
            };
            if end > sent {
                // A client that went away stops the generation.
                if pieces.blocking_send(Piece::Text(text[sent..end].to_owned())).is_err() {
                    return Ok(false);
                }
                sent = end;
            }
            Ok(go_on)
        });
        match result {
            Ok((tokens, stats)) => {
                if !stopped && text.len() > sent {
                    let _ = pieces.blocking_send(Piece::Text(text[sent..].to_owned()));
                }
                let finish_reason = if stopped || stats.stopped_at_eos { "stop" } else { "length" };
                let usage = Usage {
                    prompt_tokens: ids.len(),
                    completion_tokens: tokens.len(),
                    total_tokens: ids.len() + tokens.len(),
                };
                Piece::Done { finish_reason, usage }
            }
            Err(e) => Piece::Failed(crate::model::mlx_message(&e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::safe_end;

    #[test]
    fn text_is_held_back_only_as_far_as_a_stop_string_could_reach() {
        assert_eq!(safe_end("hello wor", 0, 0), 9);
        assert_eq!(safe_end("hello wor", 0, 4), 6);
        assert_eq!(safe_end("hé", 0, 2), 1);
        assert_eq!(safe_end("ab", 2, 5), 2);
    }
}
