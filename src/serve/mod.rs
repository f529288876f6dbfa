//! `blossom-p2p serve`: an OpenAI-compatible HTTP server (axum) for the base
//! model with an adapter, or for the newest average of a running node
//! (`--follow`). `api` holds the request and response bodies, `worker` the
//! model thread and its bounded queue, `follow` the data-directory watcher.

pub mod api;
pub mod follow;
pub mod worker;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use api::{ApiError, ChatRequest, CompletionRequest, Usage, parse};
use worker::{ModelWorker, Piece, Prompt, SubmitError};

/// Tokens a chat completion may produce when the request names no limit.
const DEFAULT_CHAT_TOKENS: u32 = 512;
/// OpenAI's default for `/v1/completions`.
const DEFAULT_COMPLETION_TOKENS: u32 = 16;

/// Everything a handler needs.
#[derive(Clone)]
pub struct AppState {
    pub worker: ModelWorker,
    /// The model's name in responses and `/v1/models`.
    pub model_id: String,
    pub api_key: Option<String>,
    next_id: Arc<AtomicU64>,
    created: u64,
}

impl AppState {
    pub fn new(worker: ModelWorker, model_id: String, api_key: Option<String>) -> Self {
        Self {
            worker,
            model_id,
            api_key,
            next_id: Arc::new(AtomicU64::new(1)),
            created: now(),
        }
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(self.body())).into_response()
    }
}

/// The routes, with the bearer-token check when `--api-key` is set.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .fallback(|| async { ApiError { status: 404, kind: "not_found_error", message: "no such endpoint: try /v1/models, /v1/chat/completions or /v1/completions".into() } })
        .layer(middleware::from_fn_with_state(state.clone(), check_key))
        .with_state(state)
}

async fn check_key(State(state): State<AppState>, headers: HeaderMap, request: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            return ApiError {
                status: 401,
                kind: "authentication_error",
                message: "missing or wrong API key: send `Authorization: Bearer <key>` with the key given to --api-key".into(),
            }
            .into_response();
        }
    }
    next.run(request).await
}

async fn models(State(state): State<AppState>) -> Response {
    let adapter = state.worker.adapter.read().ok().and_then(|a| a.clone());
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": state.model_id,
            "object": "model",
            "created": state.created,
            "owned_by": "blossom-p2p",
            "adapter": adapter,
        }],
    }))
    .into_response()
}

/// Which endpoint a generation answers, for the response shapes.
#[derive(Clone, Copy, PartialEq)]
enum Endpoint {
    Chat,
    Completion,
}

impl Endpoint {
    fn object(self, chunk: bool) -> &'static str {
        match (self, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    fn choice(self, text: &str, first: bool, finish_reason: Option<&str>, chunk: bool) -> Value {
        match (self, chunk) {
            (Endpoint::Chat, false) => json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}),
            (Endpoint::Chat, true) => {
                let delta = match (first, finish_reason) {
                    (_, Some(_)) => json!({}),
                    (true, None) => json!({"role": "assistant", "content": text}),
                    (false, None) => json!({"content": text}),
                };
                json!({"index": 0, "delta": delta, "finish_reason": finish_reason})
            }
            (Endpoint::Completion, _) => json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish_reason}),
        }
    }
}

/// One generation request, checked and ready to queue.
struct Generation {
    endpoint: Endpoint,
    prompt: Prompt,
    stream: bool,
    include_usage: bool,
    echo: Option<String>,
    sampling: api::Sampling,
    default_max: u32,
}

async fn chat(State(state): State<AppState>, body: Bytes) -> Response {
    let request: ChatRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let messages = match request.messages() {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    let generation = Generation {
        endpoint: Endpoint::Chat,
        prompt: Prompt::Chat(messages),
        stream: request.stream,
        include_usage: request.stream_options.as_ref().is_some_and(|o| o.include_usage),
        echo: None,
        sampling: request.sampling(),
        default_max: DEFAULT_CHAT_TOKENS,
    };
    run(state, generation).await
}

async fn completions(State(state): State<AppState>, body: Bytes) -> Response {
    let request: CompletionRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let prompt = match request.prompt() {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let generation = Generation {
        endpoint: Endpoint::Completion,
        echo: request.echo.then(|| prompt.clone()),
        prompt: Prompt::Text(prompt),
        stream: request.stream,
        include_usage: request.stream_options.as_ref().is_some_and(|o| o.include_usage),
        sampling: request.sampling.clone(),
        default_max: DEFAULT_COMPLETION_TOKENS,
    };
    run(state, generation).await
}

async fn run(state: AppState, generation: Generation) -> Response {
    let (params, stop) = match generation.sampling.checked(generation.default_max) {
        Ok(checked) => checked,
        Err(e) => return e.into_response(),
    };
    let mut pieces = match state.worker.submit(generation.prompt, params, stop) {
        Ok(rx) => rx,
        Err(SubmitError::Busy(queue)) => {
            return ApiError {
                status: 429,
                kind: "rate_limit_error",
                message: format!("the server is busy: {queue} requests are already waiting (serve --queue); retry shortly"),
            }
            .into_response();
        }
        Err(SubmitError::Stopped) => {
            return ApiError {
                status: 503,
                kind: "server_error",
                message: "the model thread has stopped".into(),
            }
            .into_response();
        }
    };
    let id = format!(
        "{}-{}",
        if generation.endpoint == Endpoint::Chat { "chatcmpl" } else { "cmpl" },
        state.next_id.fetch_add(1, Ordering::Relaxed)
    );
    let created = now();
    let head = json!({"id": id, "object": generation.endpoint.object(generation.stream), "created": created, "model": state.model_id});
    if generation.stream {
        return stream(pieces, head, generation.endpoint, generation.include_usage, generation.echo).into_response();
    }
    let mut text = generation.echo.unwrap_or_default();
    // Bounded: the worker ends every request with Done or Failed, or drops the channel.
    loop {
        match pieces.recv().await {
            Some(Piece::Text(t)) => text.push_str(&t),
            Some(Piece::Done { finish_reason, usage }) => {
                let mut body = head;
                body["choices"] = json!([generation.endpoint.choice(&text, true, Some(finish_reason), false)]);
                body["usage"] = json!(usage);
                return axum::Json(body).into_response();
            }
            Some(Piece::Failed(message)) => return ApiError { status: 500, kind: "server_error", message }.into_response(),
            None => return ApiError { status: 500, kind: "server_error", message: "the model thread stopped".into() }.into_response(),
        }
    }
}

/// Server-sent events: a chunk per piece of text, a last chunk with the
/// finish reason, the usage if asked for, then `[DONE]`.
fn stream(pieces: mpsc::Receiver<Piece>, head: Value, endpoint: Endpoint, include_usage: bool, echo: Option<String>) -> impl IntoResponse {
    struct Streaming {
        pieces: mpsc::Receiver<Piece>,
        head: Value,
        first: bool,
        pending: Vec<Event>,
        finished: bool,
    }
    let chunk = move |head: &Value, choices: Value, usage: Option<Usage>| {
        let mut body = head.clone();
        body["choices"] = choices;
        if let Some(usage) = usage {
            body["usage"] = json!(usage);
        }
        Event::default().data(body.to_string())
    };
    let mut pending = Vec::new();
    if let Some(echo) = echo {
        pending.push(chunk(&head, json!([endpoint.choice(&echo, true, None, true)]), None));
    }
    let start = Streaming { pieces, head, first: pending.is_empty(), pending, finished: false };
    let events = futures::stream::unfold(start, move |mut s| async move {
        // Bounded: each pass yields an event or ends the stream.
        loop {
            if !s.pending.is_empty() {
                let event = s.pending.remove(0);
                return Some((Ok::<Event, Infallible>(event), s));
            }
            if s.finished {
                return None;
            }
            match s.pieces.recv().await {
                Some(Piece::Text(text)) => {
                    let event = chunk(&s.head, json!([endpoint.choice(&text, s.first, None, true)]), None);
                    s.first = false;
                    return Some((Ok(event), s));
                }
                Some(Piece::Done { finish_reason, usage }) => {
                    s.pending.push(chunk(&s.head, json!([endpoint.choice("", s.first, Some(finish_reason), true)]), None));
                    if include_usage {
                        s.pending.push(chunk(&s.head, json!([]), Some(usage)));
                    }
                    s.pending.push(Event::default().data("[DONE]"));
                    s.finished = true;
                }
                Some(Piece::Failed(message)) => {
                    s.pending.push(Event::default().data(ApiError { status: 500, kind: "server_error", message }.body().to_string()));
                    s.finished = true;
                }
                None => return None,
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}

/// Serves on `addr` until Ctrl-C; returns the bound address through `bound`.
pub async fn serve(state: AppState, addr: SocketAddr, bound: impl FnOnce(SocketAddr)) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    bound(listener.local_addr()?);
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
}
