//! mlx-lm's jsonl files (`train.jsonl`, `valid.jsonl`, `test.jsonl`): one
//! JSON object a line, in one of mlx-lm's row formats. `layout` finds the
//! files; this reads them.

use std::path::Path;

use super::template::PromptTemplate;
use super::{DataError, Row, Sample};

/// Rows of one jsonl file; a bad line is an error naming the file and line.
pub fn read_rows(path: &Path, first_index: u64, template: Option<&PromptTemplate>) -> Result<Vec<Row>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::Read {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    let mut rows = Vec::new();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| DataError::BadRow {
            file: path.display().to_string(),
            line: number + 1,
            message,
        };
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let sample = sample_of(value, template).map_err(bad)?;
        rows.push(Row {
            index: first_index + rows.len() as u64,
            sample,
        });
    }
    Ok(rows)
}

/// A row as a sample: rendered by the prompt template when there is one,
/// else in one of mlx-lm's formats. Shared with Parquet records.
pub fn sample_of(value: serde_json::Value, template: Option<&PromptTemplate>) -> Result<Sample, String> {
    match template {
        Some(template) => template.render_row(&value),
        None => parse_sample(value),
    }
}

/// One of `{"messages"}`, `{"prompt","completion"}` or `{"text"}`, checked.
pub fn parse_sample(value: serde_json::Value) -> Result<Sample, String> {
    let object = value.as_object().ok_or("each line must be a JSON object")?;
    let sample = if object.contains_key("messages") {
        Sample::Messages {
            messages: serde_json::from_value(object["messages"].clone())
                .map_err(|e| format!("`messages` must be a list of {{\"role\", \"content\"}} objects: {e}"))?,
        }
    } else if object.contains_key("prompt") || object.contains_key("completion") {
        match (object.get("prompt").and_then(|v| v.as_str()), object.get("completion").and_then(|v| v.as_str())) {
            (Some(prompt), Some(completion)) => Sample::PromptCompletion {
                prompt: prompt.to_owned(),
                completion: completion.to_owned(),
            },
            _ => return Err("`prompt` and `completion` must both be strings".into()),
        }
    } else if let Some(text) = object.get("text") {
        Sample::Text {
            text: text.as_str().ok_or("`text` must be a string")?.to_owned(),
        }
    } else {
        let keys: Vec<&str> = object.keys().map(String::as_str).collect();
        return Err(format!(
            "unknown row format with keys {keys:?}: expected `messages`, `prompt` + `completion`, or `text`"
        ));
    };
    if let Sample::Messages { messages } = &sample {
        if messages.is_empty() {
            return Err("`messages` is empty".into());
        }
        if let Some(bad) = messages.iter().find(|m| !["system", "user", "assistant", "tool"].contains(&m.role.as_str())) {
            return Err(format!("unknown role `{}` (expected system, user, assistant or tool)", bad.role));
        }
    }
    Ok(sample)
}
