//! Tokenizers: built from a GGUF file's vocabulary (byte-level BPE) or read
//! from a Hugging Face `tokenizer.json`, plus the special tokens and chat
//! template that go with them.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use super::ModelError;
use super::chat::{ChatMessage, render_chat_template};

/// Llama 3's pre-tokenizer split (llama.cpp `llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen 2's: like Llama 3's, but one digit at a time.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// What a GGUF file says about its tokenizer.
#[derive(Debug, Clone)]
pub struct GgufVocab {
    /// `gpt2` for byte-level BPE; `llama` (SentencePiece) is not supported yet.
    pub model: String,
    /// The pre-tokenizer: `smollm`, `llama-bpe`, `qwen2`, `gpt2`, `default`...
    pub pre: String,
    pub tokens: Vec<String>,
    pub merges: Vec<String>,
    pub token_types: Option<Vec<i32>>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub add_bos_token: bool,
    pub chat_template: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token: Option<String>,
    bos_id: Option<u32>,
    /// Generation stops at any of these.
    eos_ids: Vec<u32>,
    eos_token: Option<String>,
    chat_template: Option<String>,
    /// The GGUF vocabulary it was built from (GGUF export writes it back).
    gguf_vocab: Option<GgufVocab>,
}

impl Tokenizer {
    pub fn from_gguf(vocab: &GgufVocab) -> Result<Self, ModelError> {
        if vocab.model != "gpt2" {
            return Err(ModelError::Tokenizer(format!(
                "GGUF tokenizer model `{}` is not supported (only byte-level BPE, `gpt2`)",
                vocab.model
            )));
        }
        let vocab_map: tokenizers::models::bpe::Vocab = vocab
            .tokens
            .iter()
            .enumerate()
            .map(|(id, token)| (token.clone(), id as u32))
            .collect();
        let merges = vocab
            .merges
            .iter()
            .map(|merge| {
                merge
                    .split_once(' ')
                    .map(|(a, b)| (a.to_owned(), b.to_owned()))
                    .ok_or_else(|| ModelError::Tokenizer(format!("malformed merge `{merge}`")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab_map, merges)
            .build()
            .map_err(|e| ModelError::Tokenizer(format!("cannot build BPE from the GGUF vocabulary: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let byte_level = |use_regex| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, use_regex));
        let split = |pattern: &str| -> Result<PreTokenizerWrapper, ModelError> {
            let split = Split::new(SplitPattern::Regex(pattern.to_owned()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
            Ok(PreTokenizerWrapper::Split(split))
        };
        let pre = match vocab.pre.as_str() {
            // SmolLM: digits one by one, then GPT-2's byte-level split.
            "smollm" => Sequence::new(vec![PreTokenizerWrapper::Digits(Digits::new(true)), byte_level(true)]),
            "gpt2" | "default" => Sequence::new(vec![byte_level(true)]),
            "llama-bpe" | "llama3" => Sequence::new(vec![split(LLAMA3_SPLIT)?, byte_level(false)]),
            "qwen2" => Sequence::new(vec![split(QWEN2_SPLIT)?, byte_level(false)]),
            other => {
                return Err(ModelError::Tokenizer(format!(
                    "GGUF pre-tokenizer `{other}` is not supported (supported: smollm, gpt2, llama-bpe, qwen2)"
                )));
            }
        };
        inner.with_pre_tokenizer(Some(pre));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        // Control and user-defined tokens are matched whole in the input text
        // (so "<|im_start|>" in a chat prompt is one token).
        if let Some(types) = &vocab.token_types {
            let special: Vec<AddedToken> = vocab
                .tokens
                .iter()
                .zip(types)
                .filter(|(_, t)| **t == TOKEN_TYPE_CONTROL || **t == TOKEN_TYPE_USER_DEFINED)
                .map(|(token, t)| AddedToken::from(token.clone(), *t == TOKEN_TYPE_CONTROL))
                .collect();
            inner.add_special_tokens(&special);
        }
        let token = |id: Option<u32>| id.and_then(|id| vocab.tokens.get(id as usize).cloned());
        let bos_token = token(vocab.bos_token_id);
        // BOS goes in as Hugging Face tokenizers do it, through the
        // post-processor, so the exported tokenizer.json behaves the same.
        if let (true, Some(bos), Some(id)) = (vocab.add_bos_token, &bos_token, vocab.bos_token_id) {
            let template = TemplateProcessing::builder()
                .try_single(format!("{bos} $A"))
                .and_then(|b| b.special_tokens(vec![(bos.clone(), id)]).build().map_err(|e| e.to_string()))
                .map_err(|e| ModelError::Tokenizer(format!("cannot build the BOS post-processor: {e}")))?;
            inner.with_post_processor(Some(template));
        }
        Ok(Self {
            bos_token,
            bos_id: vocab.bos_token_id,
            eos_ids: vocab.eos_token_id.into_iter().collect(),
            eos_token: token(vocab.eos_token_id),
            chat_template: vocab.chat_template.clone(),
            gguf_vocab: Some(vocab.clone()),
            inner,
        })
    }

    pub fn gguf_vocab(&self) -> Option<&GgufVocab> {
        self.gguf_vocab.as_ref()
    }

    /// A Hugging Face model folder: `tokenizer.json`, `tokenizer_config.json`
    /// (special tokens, `add_bos_token`, `chat_template`), `chat_template.jinja`
    /// and `generation_config.json` (extra stop ids).
    pub fn from_hf_folder(dir: &Path) -> Result<Self, ModelError> {
        let tokenizer_json = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&tokenizer_json)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", tokenizer_json.display())))?;
        let read_json = |name: &str| -> Result<Option<serde_json::Value>, ModelError> {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(text) => serde_json::from_str(&text)
                    .map(Some)
                    .map_err(|e| ModelError::Tokenizer(format!("{}: not valid JSON: {e}", path.display()))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(ModelError::Tokenizer(format!("{}: {e}", path.display()))),
            }
        };
        let config = read_json("tokenizer_config.json")?.unwrap_or_default();
        // Special tokens are strings or {"content": ...} objects.
        let token_text = |key: &str| -> Option<String> {
            match config.get(key)? {
                serde_json::Value::String(s) => Some(s.clone()),
                other => other.get("content")?.as_str().map(str::to_owned),
            }
        };
        let bos_token = token_text("bos_token");
        let eos_token = token_text("eos_token");
        let mut eos_ids: Vec<u32> = eos_token.iter().filter_map(|t| inner.token_to_id(t)).collect();
        if let Some(generation) = read_json("generation_config.json")? {
            match generation.get("eos_token_id") {
                Some(serde_json::Value::Number(n)) => eos_ids.extend(n.as_u64().map(|v| v as u32)),
                Some(serde_json::Value::Array(ids)) => eos_ids.extend(ids.iter().filter_map(|v| v.as_u64()).map(|v| v as u32)),
                _ => {}
            }
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        let chat_template = match std::fs::read_to_string(dir.join("chat_template.jinja")) {
            Ok(text) => Some(text),
            Err(_) => config.get("chat_template").and_then(|t| t.as_str()).map(str::to_owned),
        };
        Ok(Self {
            bos_id: bos_token.as_deref().and_then(|t| inner.token_to_id(t)),
            bos_token,
            eos_ids,
            eos_token,
            chat_template,
            gguf_vocab: None,
            inner,
        })
    }

    /// Token ids of `text`. With `add_special`, the tokenizer's own special
    /// tokens (BOS, for models that want one) are added, unless the text
    /// already starts with BOS, as chat templates often do (mlx-lm's rule).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, ModelError> {
        let has_bos = self.bos_token.as_deref().is_some_and(|bos| !bos.is_empty() && text.starts_with(bos));
        let encoding = self
            .inner
            .encode(text, add_special && !has_bos)
            .map_err(|e| ModelError::Tokenizer(format!("cannot encode text: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, ModelError> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| ModelError::Tokenizer(format!("cannot decode tokens: {e}")))
    }

    /// Decodes one token at a time, holding back bytes of an incomplete
    /// UTF-8 character until it is whole.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder {
            tokenizer: self,
            ids: Vec::new(),
            emitted: 0,
        }
    }

    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// The Hugging Face `tokenizer.json` of this tokenizer (what `export` writes).
    pub fn to_json(&self) -> Result<String, ModelError> {
        self.inner
            .to_string(true)
            .map_err(|e| ModelError::Tokenizer(format!("cannot serialize: {e}")))
    }

    /// Renders `messages` through the chat template; without a template, the
    /// last user message is used as it is.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, ModelError> {
        match &self.chat_template {
            Some(template) => render_chat_template(template, messages, add_generation_prompt, self.bos_token(), self.eos_token()),
            None => Ok(messages.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n")),
        }
    }

    /// Prompt token ids for a chat: the template's text, with BOS if needed.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, ModelError> {
        let text = self.apply_chat_template(messages, true)?;
        self.encode(&text, true)
    }
}

pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    emitted: usize,
}

impl StreamDecoder<'_> {
    /// Adds a token and returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<String, ModelError> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids, true)?;
        if text.ends_with('\u{FFFD}') || text.len() < self.emitted {
            return Ok(String::new());
        }
        let new = text[self.emitted..].to_owned();
        self.emitted = text.len();
        Ok(new)
    }
}
