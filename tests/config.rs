//! Configuration: defaults, files, `--set` overrides, and the error for each
//! kind of bad value (which must name the key and where it came from).

use std::path::{Path, PathBuf};

use blossom_p2p::config::{Aggregation, CompressionKind, Config, ConfigError, FineTuneType, Origin};

fn write_config(dir: &tempfile::TempDir, text: &str) -> PathBuf {
    let path = dir.path().join("run.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

fn load_err(file: Option<&Path>, overrides: &[&str]) -> ConfigError {
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    Config::load(file, &overrides).expect_err("config should be rejected")
}

#[test]
fn defaults_match_the_inherited_system() {
    let config = Config::load(None, &[]).expect("defaults are valid");
    assert!(config.model.source.ends_with("SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert_eq!(config.lora.fine_tune_type, FineTuneType::Dora);
    assert_eq!(config.lora.num_layers, 10);
    assert_eq!(config.lora.rank, 8);
    assert_eq!(config.lora.alpha, 16.0);
    assert_eq!(config.lora.dropout, 0.1);
    assert_eq!(config.lora.scale, 100.0);
    assert_eq!(config.train.batch_size, 1);
    assert_eq!(config.train.local_steps, 10);
    assert_eq!(config.train.max_seq_length, 512);
    assert_eq!(config.train.learning_rate, 5e-5);
    assert_eq!(config.train.learning_rate_min, 1e-6);
    assert_eq!(config.federation.rounds, 10);
    assert_eq!(config.federation.nodes, 10);
    assert_eq!(config.federation.aggregation, Aggregation::Fedavg);
}

#[test]
fn shipped_default_file_equals_built_in_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/default.toml");
    let from_file = Config::load(Some(&path), &[]).expect("configs/default.toml is valid");
    assert_eq!(from_file, Config::default());
}

#[test]
fn file_values_and_overrides_apply_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(&dir, "[lora]\nrank = 4\nfine_tune_type = \"lora\"\n[federation]\nrounds = 3\n");
    let overrides = vec![
        "lora.rank=16".to_owned(),
        "model.source=hf:HuggingFaceTB/SmolLM2-135M-Instruct".to_owned(),
        "network.bootstrap=[\"/ip4/127.0.0.1/tcp/4001\"]".to_owned(),
        "federation.aggregation=trimmed-mean".to_owned(),
    ];
    let config = Config::load(Some(&path), &overrides).expect("valid");
    assert_eq!(config.lora.rank, 16, "--set wins over the file");
    assert_eq!(config.lora.fine_tune_type, FineTuneType::Lora, "file wins over defaults");
    assert_eq!(config.federation.rounds, 3);
    assert_eq!(config.lora.num_layers, 10, "untouched keys keep defaults");
    assert_eq!(config.model.source, "hf:HuggingFaceTB/SmolLM2-135M-Instruct");
    assert_eq!(config.network.bootstrap, vec!["/ip4/127.0.0.1/tcp/4001".to_owned()]);
    assert_eq!(config.federation.aggregation, Aggregation::TrimmedMean);
}

#[test]
fn unknown_key_in_file_names_key_and_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(&dir, "[lora]\nrnak = 4\n");
    let err = load_err(Some(&path), &[]);
    let text = err.to_string();
    assert!(matches!(&err, ConfigError::Invalid { origin: Origin::File(p), .. } if p == &path), "{text}");
    assert!(text.contains("rnak"), "{text}");
    assert!(text.contains("lora"), "{text}");
    assert!(text.contains(&path.display().to_string()), "{text}");
}

#[test]
fn unknown_section_in_file_is_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(&dir, "[loar]\nrank = 4\n");
    let text = load_err(Some(&path), &[]).to_string();
    assert!(text.contains("loar"), "{text}");
    assert!(text.contains(&path.display().to_string()), "{text}");
}

#[test]
fn wrong_type_in_file_names_key_and_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(&dir, "[train]\nbatch_size = \"four\"\n");
    let err = load_err(Some(&path), &[]);
    let text = err.to_string();
    assert!(matches!(&err, ConfigError::Invalid { key, .. } if key == "train.batch_size"), "{text}");
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains("four"), "{text}");
}

#[test]
fn bad_enum_value_lists_the_choices() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(&dir, "[federation]\naggregation = \"mean\"\n");
    let text = load_err(Some(&path), &[]).to_string();
    assert!(text.contains("federation.aggregation"), "{text}");
    assert!(text.contains("trimmed-mean"), "{text}");
    let path = write_config(&dir, "[federation]\nexchange = \"allreduce\"\n");
    let text = load_err(Some(&path), &[]).to_string();
    assert!(text.contains("federation.exchange") && text.contains("reduce"), "{text}");
}

#[test]
fn out_of_range_in_file_names_key_and_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(&dir, "[lora]\ndropout = 1.5\n");
    let err = load_err(Some(&path), &[]);
    let text = err.to_string();
    assert!(matches!(&err, ConfigError::Invalid { key, origin: Origin::File(_), .. } if key == "lora.dropout"), "{text}");
    assert!(text.contains("1.5"), "{text}");
    assert!(text.contains(&path.display().to_string()), "{text}");
}

#[test]
fn each_range_check_fires() {
    let cases = [
        ("lora.rank=0", "lora.rank"),
        ("lora.num_layers=0", "lora.num_layers"),
        ("lora.alpha=-1.0", "lora.alpha"),
        ("lora.scale=nan", "lora.scale"),
        ("lora.keys=[]", "lora.keys"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.local_steps=0", "train.local_steps"),
        ("train.max_seq_length=4", "train.max_seq_length"),
        ("train.pad_to=0", "train.pad_to"),
        ("train.learning_rate=0.0", "train.learning_rate"),
        ("train.learning_rate_min=1.0", "train.learning_rate_min"),
        ("train.grad_accumulation_steps=0", "train.grad_accumulation_steps"),
        ("federation.rounds=0", "federation.rounds"),
        ("federation.nodes=100000", "federation.nodes"),
        ("federation.trim_fraction=0.5", "federation.trim_fraction"),
        ("federation.num_buckets=0", "federation.num_buckets"),
        ("federation.save_every_rounds=0", "federation.save_every_rounds"),
        ("federation.round_timeout_secs=0", "federation.round_timeout_secs"),
        ("federation.min_members=0", "federation.min_members"),
        ("federation.replicas=0", "federation.replicas"),
        ("federation.replicas=9", "federation.replicas"),
        ("federation.audit=1.5", "federation.audit"),
        ("federation.outer_lr=0.0", "federation.outer_lr"),
        ("federation.outer_lr=11.0", "federation.outer_lr"),
        ("federation.outer_momentum=1.0", "federation.outer_momentum"),
        ("network.listen=[\"0.0.0.0:4001\"]", "network.listen"),
        ("model.source=\"\"", "model.source"),
        ("data.dataset=\" \"", "data.dataset"),
    ];
    for (arg, key) in cases {
        let err = load_err(None, &[arg]);
        match &err {
            ConfigError::Invalid { key: got, origin: Origin::Override(from), .. } => {
                assert_eq!(got, key, "{arg}: {err}");
                assert_eq!(from, arg, "{arg}: {err}");
            }
            other => panic!("{arg}: expected a range error on {key}, got {other}"),
        }
        assert!(err.to_string().contains(&format!("--set {arg}")), "{err}");
    }
}

/// Compressed updates are changes: exact averaging (products of whole
/// adapters' A and B) is refused with them, with what to do.
#[test]
fn compression_with_exact_averaging_is_refused() {
    let err = load_err(None, &["federation.aggregation=\"exact\"", "federation.compression=\"int8\""]).to_string();
    assert!(err.contains("federation.compression") && err.contains("exact") && err.contains("\"none\""), "{err}");
    for method in ["median", "norm-clip"] {
        let aggregation = format!("federation.aggregation=\"{method}\"");
        assert!(Config::load(None, &[aggregation, "federation.compression=\"fp16\"".to_owned()]).is_ok(), "{method}");
    }
}

/// Unset, updates travel as int8 changes, and as float32 adapters under
/// exact averaging (which a user then need not turn compression off for).
#[test]
fn compression_defaults_to_int8_and_to_none_under_exact_averaging() {
    let default = Config::load(None, &[]).unwrap();
    assert_eq!(default.federation.compression(), CompressionKind::Int8);
    let exact = Config::load(None, &["federation.aggregation=\"exact\"".to_owned()]).unwrap();
    assert_eq!(exact.federation.compression(), CompressionKind::None);
    let plain = Config::load(None, &["federation.compression=\"none\"".to_owned()]).unwrap();
    assert_eq!(plain.federation.compression(), CompressionKind::None);
}

#[test]
fn unknown_key_in_override_names_the_override() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(&dir, "[lora]\nrank = 4\n");
    let err = load_err(Some(&path), &["lora.rnak=4"]);
    let text = err.to_string();
    assert!(text.contains("--set lora.rnak=4"), "{text}");
    assert!(text.contains("rnak"), "{text}");
}

#[test]
fn wrong_type_in_override_names_the_override() {
    let text = load_err(None, &["train.seed=abc"]).to_string();
    assert!(text.contains("--set train.seed=abc"), "{text}");
    assert!(text.contains("train.seed"), "{text}");
}

#[test]
fn range_error_blames_the_file_when_the_value_is_from_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(&dir, "[train]\nlearning_rate_min = 0.5\n");
    // The override is valid on its own; the file's value is what is out of range.
    let err = load_err(Some(&path), &["train.seed=3"]);
    assert!(
        matches!(&err, ConfigError::Invalid { key, origin: Origin::File(_), .. } if key == "train.learning_rate_min"),
        "{err}"
    );
}

#[test]
fn malformed_overrides_are_rejected() {
    for arg in ["lora.rank", "=4", "lora..rank=4", ".rank=4"] {
        let err = load_err(None, &[arg]);
        assert!(matches!(err, ConfigError::BadOverride { .. }), "{arg}: {err}");
        assert!(err.to_string().contains("section.key=value"), "{err}");
    }
    // A key below a value: the value's type error names the override.
    let err = load_err(None, &["lora.rank.deep=4"]);
    assert!(err.to_string().contains("--set lora.rank.deep=4"), "{err}");
    assert!(err.to_string().contains("lora.rank"), "{err}");
    // A key below a value that the file set: the path cannot be built.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(&dir, "[lora]\nrank = 4\n");
    let err = load_err(Some(&path), &["lora.rank.deep=4"]);
    assert!(err.to_string().contains("not a section"), "{err}");
}

#[test]
fn syntax_error_names_the_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(&dir, "[lora]\nrank = = 4\n");
    let err = load_err(Some(&path), &[]);
    let text = err.to_string();
    assert!(matches!(err, ConfigError::Syntax { .. }), "{text}");
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains("line 2"), "{text}");
}

#[test]
fn missing_file_is_a_clear_error() {
    let err = load_err(Some(Path::new("/nonexistent/blossom.toml")), &[]);
    assert!(matches!(err, ConfigError::Read { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/blossom.toml"), "{err}");
}
