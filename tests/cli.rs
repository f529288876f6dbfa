//! The binary as a user runs it: exit codes, error messages, logging flags,
//! and `doctor` on this (set-up) machine.

use std::process::{Command, Output};

fn blossom(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_blossom-p2p"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_LOG")
        .output()
        .expect("run blossom-p2p")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn doctor_passes_on_a_working_setup() {
    let output = blossom(&["doctor", "--json"]);
    assert!(output.status.success(), "doctor failed:\n{}\n{}", String::from_utf8_lossy(&output.stdout), stderr(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("doctor --json prints JSON");
    assert!(report["mlx_version"].as_str().is_some_and(|v| v.starts_with("0.32")), "{report}");
    assert!(report["problems"].as_array().is_some_and(Vec::is_empty), "{report}");
    assert_eq!(report["model_status"], "present, blake3 matches", "{report}");
    assert!(report["matmul_gflops"].as_f64().is_some_and(|g| g > 0.0), "{report}");
    if cfg!(target_os = "linux") {
        assert_eq!(report["device"], "cpu");
        // The point of the build's link order: MLX's cblas calls go to OpenBLAS.
        assert_eq!(report["blas"], "OpenBLAS", "{report}");
    }
}

#[test]
fn doctor_text_report_names_each_check() {
    let output = blossom(&["doctor"]);
    let text = String::from_utf8_lossy(&output.stdout);
    for line in ["MLX", "BLAS", "matmul", "GFLOP/s", "model", "all checks passed"] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
}

#[test]
fn doctor_fails_with_a_fix_when_the_model_is_missing() {
    let output = blossom(&["doctor", "--model", "models/no-such-model.gguf"]);
    assert_eq!(output.status.code(), Some(1));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("no-such-model.gguf is missing"), "{text}");
    assert!(text.contains("fix: fetch it: bash scripts/setup.sh"), "{text}");
}

#[test]
fn doctor_fails_when_the_model_hash_is_wrong() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = dir.path().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    std::fs::write(&fake, b"GGUF but not the right bytes").expect("write");
    let output = blossom(&["doctor", "--model", fake.to_str().expect("utf-8 path")]);
    assert_eq!(output.status.code(), Some(1));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("WRONG blake3"), "{text}");
    assert!(text.contains("expected 5f4fa13b"), "{text}");
}

#[test]
fn doctor_loads_and_runs_another_model() {
    let output = blossom(&["doctor", "--json", "--model", "tests/fixtures/gguf/tiny-kquants.gguf"]);
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("doctor --json prints JSON");
    assert_eq!(report["model_status"], "loads and runs", "{report}");
    let run = &report["model_run"];
    assert_eq!(run["architecture"], "llama", "{report}");
    // 2 layers of q, o (256x256), k, v (128x256) and 3 256x512 projections,
    // and the 288x256 embedding and output head.
    assert_eq!(run["parameters"], 2 * (2 * 256 * 256 + 2 * 128 * 256 + 3 * 256 * 512) + 2 * 288 * 256, "{report}");
    assert!(run["generation_tokens_per_sec"].as_f64().is_some_and(|t| t > 0.0), "{report}");
    assert!(run["held_as"].as_str().is_some_and(|h| h.starts_with("float32")), "{report}");

    let dir = tempfile::tempdir().expect("tempdir");
    let broken = dir.path().join("broken.gguf");
    std::fs::write(&broken, b"GGUF but not a model").expect("write");
    let output = blossom(&["doctor", "--model", broken.to_str().expect("utf-8 path")]);
    assert_eq!(output.status.code(), Some(1));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("broken.gguf does not load: ") && text.contains("not a valid GGUF file"), "{text}");
}

/// Forcing the wheel's reference BLAS in front of OpenBLAS must be caught.
#[cfg(target_os = "linux")]
#[test]
fn doctor_detects_the_slow_reference_blas() {
    let libs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".deps/mlx-cpu/mlx_cpu.libs");
    let reference = std::fs::read_dir(&libs)
        .expect("the MLX wheel is unpacked")
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libblas")))
        .expect("the wheel bundles a reference libblas");
    let output = Command::new(env!("CARGO_BIN_EXE_blossom-p2p"))
        .args(["doctor", "--json"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("LD_PRELOAD", &reference)
        .output()
        .expect("run doctor");
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(report["blas"], "reference BLAS (slow)", "{report}");
    let problems = report["problems"].to_string();
    assert!(problems.contains("reference BLAS"), "{problems}");
    assert!(problems.contains("libopenblas0-pthread"), "{problems}");
}

#[test]
fn status_of_a_directory_where_no_node_ran_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let output = blossom(&["status", "--data-dir", dir.path().to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("no node has run in"), "{}", stderr(&output));
}

#[test]
fn set_before_and_after_the_subcommand_both_apply() {
    // The bad value before the subcommand is not dropped for the one after it.
    let output = blossom(&["--set", "lora.rank=0", "status", "--set", "lora.num_layers=4"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("--set lora.rank=0: lora.rank: must be between 1 and 4096"), "{}", stderr(&output));
}

#[test]
fn bad_config_is_reported_before_anything_runs() {
    let output = blossom(&["--set", "lora.rank=0", "doctor"]);
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(err.contains("--set lora.rank=0: lora.rank: must be between 1 and 4096"), "{err}");

    let output = blossom(&["--set", "relay.max_peer_mbit_per_sec=-5", "relay"]);
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(err.contains("relay.max_peer_mbit_per_sec: must be a number of megabits a second, 0 or more (0: no cap), got -5"), "{err}");

    let output = blossom(&["--config", "configs/nope.toml", "status"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("cannot read config file configs/nope.toml"), "{}", stderr(&output));
}

#[test]
fn bad_flags_are_usage_errors() {
    let output = blossom(&["simulate", "--nodes", "0"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("--nodes"), "{}", stderr(&output));

    let output = blossom(&["start", "--partition-id", "4", "--num-partitions", "4"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("must be below --num-partitions (4)"), "{}", stderr(&output));
}

#[test]
fn json_log_format_emits_json_lines() {
    let output = blossom(&["-v", "--log-format", "json", "status"]);
    let err = stderr(&output);
    let line = err
        .lines()
        .find(|line| line.contains("configuration resolved"))
        .unwrap_or_else(|| panic!("no debug log line in:\n{err}"));
    let event: serde_json::Value = serde_json::from_str(line).expect("a JSON log line");
    assert_eq!(event["level"], "DEBUG");
    assert_eq!(event["fields"]["command"], "status");
}

#[test]
fn quiet_and_rust_log_control_verbosity() {
    // Without -v the debug line is filtered out.
    let output = blossom(&["status"]);
    assert!(!stderr(&output).contains("configuration resolved"));
    // RUST_LOG wins over the flags.
    let output = Command::new(env!("CARGO_BIN_EXE_blossom-p2p"))
        .args(["-q", "status"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUST_LOG", "debug")
        .output()
        .expect("run");
    assert!(String::from_utf8_lossy(&output.stderr).contains("configuration resolved"));
}

#[test]
fn setup_script_pins_the_same_model_hash() {
    let script = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/setup.sh")).expect("read setup.sh");
    assert!(
        script.contains(&format!("MODEL_BLAKE3=\"{}\"", blossom_p2p::default_model::DEFAULT_MODEL_BLAKE3)),
        "scripts/setup.sh and src/default_model.rs disagree on the model hash"
    );
}

#[test]
fn bad_pre_shared_keys_and_addresses_are_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("node");
    let data = data.to_str().expect("utf-8");
    let output = blossom(&["start", "--data-dir", data, "--psk", "/nonexistent/swarm.key"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("pre-shared key /nonexistent/swarm.key"), "{}", stderr(&output));
    let key = dir.path().join("swarm.key");
    std::fs::write(&key, "/key/swarm/psk/1.0.0/\n/base16/\nnot-hex\n").expect("write");
    let output = blossom(&["start", "--data-dir", data, "--psk", key.to_str().expect("utf-8")]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("64 hex digits"), "{}", stderr(&output));
    let output = blossom(&["start", "--data-dir", data, "--external-address", "1.2.3.4:4001"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("external address `1.2.3.4:4001` is not a multiaddr"), "{}", stderr(&output));
}

#[test]
fn json_logs_of_a_training_node_carry_run_peer_and_round() {
    let dir = tempfile::tempdir().unwrap();
    let output = blossom(&[
        "--log-format", "json", "-v", "--set", "model.source=tiny", "--set", "lora.num_layers=4", "--set", "federation.rounds=1",
        // One node trains alone: round 0 does not wait for a second member.
        "--set", "train.local_steps=1", "--set", "federation.min_members=1", "start", "--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0",
        "--data-dir", dir.path().to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let line = stderr(&output).lines().find(|l| l.contains("round done")).map(str::to_owned).expect("a round-done log line");
    let record: serde_json::Value = serde_json::from_str(&line).unwrap();
    let spans = record["spans"].as_array().expect("spans");
    assert!(spans.iter().any(|s| s["run"].as_str().is_some_and(|r| r.len() == 64) && s["peer"].as_str().is_some_and(|p| p.starts_with("12D3Koo"))), "{line}");
    assert!(spans.iter().any(|s| s["round"] == 0), "{line}");
}

#[test]
fn every_command_that_loads_a_model_or_data_takes_model_and_data() {
    for (command, flags) in [
        (&["start"][..], &["--model", "--data", "--quant"][..]),
        (&["simulate"], &["--model", "--data", "--quant"]),
        (&["train"], &["--model", "--data", "--quant"]),
        (&["eval"], &["--model", "--data", "--quant"]),
        (&["bench", "train"], &["--model", "--data", "--quant"]),
        (&["generate"], &["--model", "--quant"]),
        (&["serve"], &["--model", "--quant"]),
        (&["export"], &["--model"]),
        (&["bench", "generate"], &["--model"]),
    ] {
        let output = blossom(&[command, &["--help"]].concat());
        let help = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{command:?}: {}", stderr(&output));
        for flag in flags {
            assert!(help.contains(&format!("{flag} <")), "{command:?} --help lacks {flag}: {help}");
        }
    }
    // `start --help` says which model, data and run the node joins.
    let help = String::from_utf8_lossy(&blossom(&["start", "--help"]).stdout).into_owned();
    assert!(help.contains("model.source") && help.contains("data.dataset") && help.contains("run id"), "{help}");
}

#[test]
fn start_and_simulate_flags_reach_the_configuration() {
    // A data set that does not exist: the error names it, so the flag was used.
    let output = blossom(&["simulate", "--nodes", "1", "--rounds", "1", "--model", "tiny", "--data", "/nonexistent/rows"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("/nonexistent/rows"), "{}", stderr(&output));
}
