//! A table of bad inputs from people: each gets a clear message naming the
//! problem and a non-zero exit code, never a panic or a backtrace.

mod common;

use std::path::Path;

use blossom_p2p::wire::codec::{TensorBytes, TensorDtype, encode_adapter};

struct Case {
    name: &'static str,
    args: Vec<String>,
    code: i32,
    needle: &'static str,
}

fn case(name: &'static str, args: &[&str], code: i32, needle: &'static str) -> Case {
    Case {
        name,
        args: args.iter().map(|s| s.to_string()).collect(),
        code,
        needle,
    }
}

/// Writes the broken files the table refers to.
fn fixtures(dir: &Path) {
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    };
    write("syntax.toml", b"[lora\nrank = ");
    write("unknown.toml", b"[lora]\nranks = 8\n");
    write("peers.txt", b"# members\nnot-a-peer-id\n");
    let model = std::fs::read(blossom_p2p::default_model::DEFAULT_MODEL_PATH).expect("the default model (scripts/setup.sh fetches it)");
    write("truncated.gguf", &model[..1_000_000]);
    let mut corrupt = b"GGUF".to_vec();
    corrupt.extend((0..5000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    write("corrupt.gguf", &corrupt);
    let fixture = Path::new("tests/fixtures/models/llama3");
    for file in ["config.json", "model.safetensors"] {
        write(&format!("badweights/{file}"), &std::fs::read(fixture.join(file)).unwrap());
        write(&format!("badtokenizer/{file}"), &std::fs::read(fixture.join(file)).unwrap());
    }
    let weights = std::fs::read(fixture.join("model.safetensors")).unwrap();
    write("badweights/model.safetensors", &weights[..300]);
    write("badtokenizer/tokenizer.json", b"{\"model\": {");
    write("rows/train.jsonl", b"{\"bogus\": 1}\n");
    write("rows/valid.jsonl", b"{\"text\": \"x\"}\n");
    write("notjson/train.jsonl", b"not json\n");
    write("scenario.toml", b"name = \"x\"\n[[event]]\nat_round = 1\naction = \"crash\"\nnodes = [9]\n");
    // An adapter whose A matrix has the wrong shape for the tiny model.
    let adapter = encode_adapter(&[TensorBytes {
        name: "model.layers.0.self_attn.q_proj.lora_a".into(),
        dtype: TensorDtype::F32,
        shape: vec![3, 8],
        data: vec![0u8; 3 * 8 * 4],
    }])
    .unwrap();
    write("adapter/adapters.safetensors", &adapter);
    write(
        "adapter/adapter_config.json",
        br#"{"fine_tune_type": "lora", "num_layers": 4, "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0}}"#,
    );
}

#[test]
fn bad_inputs_get_clear_errors_and_non_zero_exits() {
    let dir = tempfile::tempdir().unwrap();
    fixtures(dir.path());
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = format!("/ip4/127.0.0.1/tcp/{}", listener.local_addr().unwrap().port());
    let data = format!("network.data_dir=\"{}\"", p("node"));
    let tiny = ["--set", "model.source=tiny", "--set", "lora.num_layers=4", "--set", data.as_str()];
    let with_tiny = |rest: &[&str]| -> Vec<String> { tiny.iter().chain(rest).map(|s| s.to_string()).collect() };
    let mut cases = vec![
        case("unknown flag", &["start", "--bogus"], 2, "--bogus"),
        case("unknown config key", &["--set", "lora.bogus=1", "doctor"], 2, "lora.bogus"),
        case("wrong type", &["--set", "lora.rank=\"eight\"", "doctor"], 2, "lora.rank"),
        case("out of range", &["--set", "lora.dropout=1.5", "doctor"], 2, "lora.dropout"),
        case("bad enum", &["--set", "federation.aggregation=\"mean\"", "doctor"], 2, "federation.aggregation"),
        case("zero quota", &["--set", "network.store_quota_mb=0", "doctor"], 2, "network.store_quota_mb"),
        case("iters out of range", &["train", "--model", "tiny", "--iters", "0"], 2, "--iters"),
        case("malformed bootstrap multiaddr", &["start", "--bootstrap", "1.2.3.4:4001"], 2, "1.2.3.4:4001"),
        case("malformed listen multiaddr", &["start", "--listen", "/ip4/999.1.1.1/tcp/0"], 2, "999.1.1.1"),
        case("run id not hex", &["start", "--run-id", "zz"], 2, "--run-id"),
        case("partition id too large", &["start", "--partition-id", "4", "--num-partitions", "4"], 2, "--num-partitions"),
        case("missing psk file", &["start", "--psk", "/nonexistent/swarm.key"], 2, "/nonexistent/swarm.key"),
        case("missing model", &["generate", "--model", "/nonexistent/model.gguf", "--prompt", "hi"], 2, "/nonexistent/model.gguf"),
        case("simulate: missing scenario", &["simulate", "--scenario", "/nonexistent/scenario.toml"], 2, "/nonexistent/scenario.toml"),
        case("status where no node ran", &["status", "--data-dir", "/nonexistent/node"], 1, "no node has run"),
    ];
    let owned: Vec<(&'static str, Vec<String>, i32, &'static str)> = vec![
        ("config syntax error", vec!["--config".into(), p("syntax.toml"), "doctor".into()], 2, "syntax.toml"),
        ("unknown key in a config file", vec!["--config".into(), p("unknown.toml"), "doctor".into()], 2, "ranks"),
        ("bad allowlist", with_tiny(&["start", "--no-mdns", "--allow-peers", &p("peers.txt")]), 2, "peers.txt:2"),
        ("truncated GGUF", vec!["generate".into(), "--model".into(), p("truncated.gguf"), "--prompt".into(), "hi".into()], 2, "not a valid GGUF file"),
        ("corrupt GGUF", vec!["generate".into(), "--model".into(), p("corrupt.gguf"), "--prompt".into(), "hi".into()], 2, "not a valid GGUF file"),
        ("truncated safetensors", vec!["generate".into(), "--model".into(), p("badweights"), "--prompt".into(), "hi".into()], 2, "model.safetensors"),
        ("broken tokenizer", vec!["generate".into(), "--model".into(), p("badtokenizer"), "--prompt".into(), "hi".into()], 2, "tokenizer.json"),
        ("malformed data row", vec!["train".into(), "--model".into(), "tiny".into(), "--data".into(), p("rows"), "--iters".into(), "1".into()], 2, "train.jsonl:1"),
        ("row that is not JSON", vec!["train".into(), "--model".into(), "tiny".into(), "--data".into(), p("notjson"), "--iters".into(), "1".into()], 2, "not valid JSON"),
        (
            "adapter for another model",
            vec!["generate".into(), "--model".into(), "tiny".into(), "--adapter-path".into(), p("adapter"), "--prompt".into(), "hi".into()],
            2,
            "does not match this model",
        ),
        ("simulate: a node that does not exist", with_tiny(&["simulate", "--nodes", "3", "--rounds", "3", "--scenario", &p("scenario.toml")]), 2, "node 9 does not exist"),
        ("data dir that cannot be created", vec!["start".into(), "--data-dir".into(), "/proc/blossom/node".into()], 2, "choose a writable --data-dir"),
        ("port already in use", with_tiny(&["start", "--no-mdns", "--listen", &taken]), 1, "pick another in --listen"),
        ("metrics on a public address", with_tiny(&["start", "--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0", "--metrics", "0.0.0.0:9090"]), 2, "loopback"),
        ("metrics address that is not one", vec!["start".into(), "--metrics".into(), "localhost".into()], 2, "--metrics"),
        (
            "unreachable bootstrap peer",
            with_tiny(&["start", "--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0", "--bootstrap", "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWQK22rTBY5uEJQQLQ6ZkEtgD4nuozcDaB47zj166R7TPd"]),
            1,
            "could not reach any bootstrap peer",
        ),
        (
            "full disk (store quota)",
            with_tiny(&[
                "--set", "lora.rank=64", "--set", "network.store_quota_mb=1", "--set", "federation.rounds=1", "--set", "train.local_steps=1",
                "--set", "federation.min_members=1", "start", "--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0",
            ]),
            1,
            "raise network.store_quota_mb",
        ),
    ];
    for (name, args, code, needle) in owned {
        cases.push(Case { name, args, code, needle });
    }
    assert!(cases.len() >= 25, "{} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let args: Vec<&str> = case.args.iter().map(String::as_str).collect();
        let output = common::blossom(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let problems: Vec<&str> = [
            (output.status.code() != Some(case.code), "exit code"),
            (!stderr.contains(case.needle), "message"),
            (stderr.contains("panicked") || stderr.contains("backtrace"), "panic"),
            (stderr.contains("/rustc/") || stderr.contains(".cpp:"), "internal source locations"),
        ]
        .into_iter()
        .filter_map(|(bad, what)| bad.then_some(what))
        .collect();
        if !problems.is_empty() {
            failures.push(format!(
                "{}: {problems:?} (exit {:?}, wanted {} and {:?})\n{stderr}",
                case.name,
                output.status.code(),
                case.code,
                case.needle
            ));
        }
    }
    drop(listener);
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
}
