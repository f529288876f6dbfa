//! The OpenAI API's request and response bodies, as far as this server
//! speaks it. Requests name every field they accept: an unknown field is a
//! 400 that names it, never silently ignored.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::model::chat::ChatMessage;
use crate::model::generate::SamplingParams;

/// The most tokens one request may ask for.
pub const MAX_TOKENS_LIMIT: u32 = 32_768;

/// A 4xx/5xx answer in OpenAI's error shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub kind: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            kind: "invalid_request_error",
            message: message.into(),
        }
    }

    pub fn body(&self) -> Value {
        json!({ "error": { "message": self.message, "type": self.kind, "param": null, "code": null } })
    }
}

/// `"stop"`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// A message's content: text, or a list of parts of which only text is
/// understood.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageIn {
    pub role: String,
    pub content: Content,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// What both endpoints share: sampling and stopping.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Sampling {
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    pub presence_penalty: Option<f32>,
}

const SAMPLING_FIELDS: [&str; 8] = ["max_tokens", "temperature", "top_p", "seed", "stop", "n", "frequency_penalty", "presence_penalty"];

/// A request body: its own fields plus the sampling ones (serde cannot deny
/// unknown fields through `flatten`, so [`parse`] checks the names).
pub trait Request: serde::de::DeserializeOwned {
    const FIELDS: &'static [&'static str];
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<MessageIn>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

impl Request for ChatRequest {
    const FIELDS: &'static [&'static str] = &["model", "messages", "stream", "stream_options", "max_completion_tokens", "user"];
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptIn {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub prompt: PromptIn,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub echo: bool,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

impl Request for CompletionRequest {
    const FIELDS: &'static [&'static str] = &["model", "prompt", "stream", "stream_options", "echo", "user"];
}

impl ChatRequest {
    pub fn sampling(&self) -> Sampling {
        Sampling {
            max_tokens: self.max_completion_tokens.or(self.sampling.max_tokens),
            ..self.sampling.clone()
        }
    }

    /// The conversation for the chat template.
    pub fn messages(&self) -> Result<Vec<ChatMessage>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::bad_request("`messages` is empty: send at least one message"));
        }
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "developer") {
                    return Err(ApiError::bad_request(format!(
                        "messages[{i}].role is `{}`; this server takes system, developer, user and assistant messages",
                        m.role
                    )));
                }
                let content = match &m.content {
                    Content::Text(text) => text.clone(),
                    Content::Parts(parts) => {
                        let mut text = String::new();
                        for part in parts {
                            match (part.kind.as_str(), &part.text) {
                                ("text", Some(t)) => text.push_str(t),
                                (kind, _) => {
                                    return Err(ApiError::bad_request(format!("messages[{i}] has a `{kind}` part; only text parts are supported")));
                                }
                            }
                        }
                        text
                    }
                };
                // Chat templates know `system`; `developer` is OpenAI's new name for it.
                let role = if m.role == "developer" { "system".to_owned() } else { m.role.clone() };
                Ok(ChatMessage { role, content })
            })
            .collect()
    }
}

impl CompletionRequest {
    pub fn prompt(&self) -> Result<String, ApiError> {
        match &self.prompt {
            PromptIn::One(text) => Ok(text.clone()),
            PromptIn::Many(list) if list.len() == 1 => Ok(list[0].clone()),
            PromptIn::Many(list) => Err(ApiError::bad_request(format!("`prompt` has {} prompts; send one per request", list.len()))),
        }
    }
}

impl Sampling {
    /// Checked sampling parameters and stop strings; `default_max` when the
    /// request names no limit.
    pub fn checked(&self, default_max: u32) -> Result<(SamplingParams, Vec<String>), ApiError> {
        let max_tokens = self.max_tokens.unwrap_or(default_max);
        if max_tokens == 0 || max_tokens > MAX_TOKENS_LIMIT {
            return Err(ApiError::bad_request(format!("`max_tokens` is {max_tokens}; it must be between 1 and {MAX_TOKENS_LIMIT}")));
        }
        let temperature = self.temperature.unwrap_or(0.0);
        if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
            return Err(ApiError::bad_request(format!("`temperature` is {temperature}; it must be between 0 and 2")));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::bad_request(format!("`top_p` is {top_p}; it must be in (0, 1]")));
        }
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad_request("`n` must be 1: this server returns one choice per request"));
        }
        for (name, value) in [("frequency_penalty", self.frequency_penalty), ("presence_penalty", self.presence_penalty)] {
            if value.is_some_and(|v| v != 0.0) {
                return Err(ApiError::bad_request(format!("`{name}` is not supported; leave it out or send 0")));
            }
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(list)) => list.clone(),
        };
        if stop.len() > 4 || stop.iter().any(String::is_empty) {
            return Err(ApiError::bad_request("`stop` takes up to 4 non-empty strings"));
        }
        let params = SamplingParams {
            max_tokens,
            temperature,
            top_p,
            seed: self.seed.unwrap_or(0),
        };
        Ok((params, stop))
    }
}

/// Token counts of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

/// Parses a request body, naming the field that is wrong or unknown.
pub fn parse<T: Request>(body: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    let object = value.as_object().ok_or_else(|| ApiError::bad_request("invalid JSON body: expected an object"))?;
    if let Some(unknown) = object.keys().find(|k| !T::FIELDS.contains(&k.as_str()) && !SAMPLING_FIELDS.contains(&k.as_str())) {
        let known: Vec<&str> = T::FIELDS.iter().chain(&SAMPLING_FIELDS).copied().collect();
        return Err(ApiError::bad_request(format!("invalid JSON body: unknown field `{unknown}`; this server takes {}", known.join(", "))));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let at = if path.is_empty() || path == "." { String::new() } else { format!(" at `{path}`") };
        ApiError::bad_request(format!("invalid JSON body{at}: {inner}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_and_bad_values_are_named() {
        let error = parse::<ChatRequest>(br#"{"messages":[{"role":"user","content":"hi"}],"temprature":1}"#).unwrap_err();
        assert!(error.message.contains("unknown field `temprature`"), "{}", error.message);
        let error = parse::<ChatRequest>(b"{not json").unwrap_err();
        assert_eq!(error.status, 400);
        let request: ChatRequest = parse(br#"{"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],"max_tokens":0}"#).unwrap();
        assert!(request.sampling().checked(16).unwrap_err().message.contains("max_tokens"));
        assert_eq!(request.messages().unwrap()[0].content, "hi");
        let request: ChatRequest = parse(br#"{"messages":[{"role":"tool","content":"x"}]}"#).unwrap();
        assert!(request.messages().unwrap_err().message.contains("role"));
        let request: CompletionRequest = parse(br#"{"prompt":"a","stop":["x","y"],"temperature":0.5,"seed":3}"#).unwrap();
        let (params, stop) = request.sampling.checked(16).unwrap();
        assert_eq!((params.max_tokens, params.temperature, params.seed, stop.len()), (16, 0.5, 3, 2));
    }
}
