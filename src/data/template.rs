//! Prompt templates (minijinja) that turn rows with arbitrary fields into a
//! prompt, such as `configs/alpaca.jinja` for instruction/input/output data
//! (the old system's default data set was Alpaca-GPT4).

use std::path::Path;

use super::Sample;

/// Fields that hold the completion, in the order they are looked for.
const COMPLETION_FIELDS: &[&str] = &["output", "completion", "response"];

#[derive(Debug, Clone)]
pub struct PromptTemplate {
    source: String,
    name: String,
}

impl PromptTemplate {
    pub fn from_file(path: &Path) -> Result<Self, super::DataError> {
        let source = std::fs::read_to_string(path).map_err(|e| super::DataError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::new(path.display().to_string(), source)
    }

    pub fn new(name: String, source: String) -> Result<Self, super::DataError> {
        let template = Self { source, name };
        // Parse now, so a broken template fails before any row is read.
        template.environment().map_err(super::DataError::Template)?;
        Ok(template)
    }

    fn environment(&self) -> Result<minijinja::Environment<'_>, String> {
        let mut env = minijinja::Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Chainable);
        env.set_keep_trailing_newline(true);
        env.add_template("prompt", &self.source)
            .map_err(|e| format!("{}: cannot parse: {e}", self.name))?;
        Ok(env)
    }

    /// The prompt for a row's fields, and its completion.
    pub fn render_row(&self, row: &serde_json::Value) -> Result<Sample, String> {
        let object = row.as_object().ok_or("each line must be a JSON object")?;
        let completion = COMPLETION_FIELDS
            .iter()
            .find_map(|field| object.get(*field).and_then(|v| v.as_str()))
            .ok_or_else(|| format!("no completion: expected a string field named one of {COMPLETION_FIELDS:?}"))?;
        let env = self.environment()?;
        let prompt = env
            .get_template("prompt")
            .and_then(|t| t.render(row))
            .map_err(|e| format!("{}: cannot render: {e}", self.name))?;
        Ok(Sample::Templated {
            templated_prompt: prompt,
            completion: completion.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpaca_template_renders_with_and_without_input() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/alpaca.jinja");
        let template = PromptTemplate::from_file(Path::new(path)).unwrap();
        let with_input = template
            .render_row(&serde_json::json!({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}))
            .unwrap();
        let Sample::Templated { templated_prompt, completion } = with_input else { panic!("templated") };
        assert_eq!(completion, "5");
        assert!(templated_prompt.contains("### Instruction:\nAdd the numbers.\n"), "{templated_prompt}");
        assert!(templated_prompt.contains("### Input:\n2 and 3\n"), "{templated_prompt}");
        assert!(templated_prompt.ends_with("### Response:\n"), "{templated_prompt:?}");
        let without = template.render_row(&serde_json::json!({"instruction": "Say hi.", "output": "hi"})).unwrap();
        let Sample::Templated { templated_prompt, .. } = without else { panic!("templated") };
        assert!(!templated_prompt.contains("### Input"), "{templated_prompt}");
        assert!(template.render_row(&serde_json::json!({"instruction": "x"})).unwrap_err().contains("no completion"));
    }
}
