//! `blossom-p2p serve` as a real process on 127.0.0.1 with the tiny model:
//! the OpenAI endpoints over raw HTTP (answers, errors, the queue's 429,
//! the API key), and the official `openai` Python client chatting and
//! following a live data directory (scripts/openai_client_check.py; skipped,
//! saying so, when the package is missing: `scripts/setup.sh` installs it).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::Node;

/// Starts `serve` with the tiny model and returns it with its address.
fn serve(extra: &[&str]) -> (Node, String) {
    let mut args = vec!["serve", "--model", "tiny", "--listen", "127.0.0.1:0"];
    args.extend(extra);
    let node = Node::spawn(&args);
    let line = node.wait_for("serving on http://");
    let addr = line.trim_start_matches("serving on http://").split('/').next().unwrap().to_owned();
    (node, addr)
}

/// One HTTP/1.1 request; returns (status, body).
fn http(addr: &str, method: &str, path: &str, body: &str, key: Option<&str>) -> (u16, String) {
    let mut socket = TcpStream::connect(addr).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    socket.read_to_string(&mut response).unwrap();
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

#[test]
fn openai_endpoints_answer_and_bad_requests_get_clear_errors() {
    let (_server, addr) = serve(&["--api-key", "secret", "--queue", "0"]);
    let key = Some("secret");
    let (status, body) = http(&addr, "GET", "/v1/models", "", None);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("--api-key"), "{body}");
    let (status, body) = http(&addr, "GET", "/v1/models", "", key);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"id\":\"tiny\""), "{body}");

    let chat = r#"{"model":"tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":4}"#;
    let (status, body) = http(&addr, "POST", "/v1/chat/completions", chat, key);
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["usage"]["completion_tokens"], 4, "{body}");
    assert_eq!(answer["choices"][0]["finish_reason"], "length");

    let stream = r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":3,"stream":true,"stream_options":{"include_usage":true}}"#;
    let (status, body) = http(&addr, "POST", "/v1/chat/completions", stream, key);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("chat.completion.chunk") && body.contains("\"completion_tokens\":3"), "{body}");
    // The last event is [DONE] (the body is chunked: a chunk size precedes it).
    assert!(body.rsplit("data: ").next().unwrap().starts_with("[DONE]"), "{body}");

    let (status, body) = http(&addr, "POST", "/v1/completions", r#"{"prompt":"a b c","max_tokens":2}"#, key);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"object\":\"text_completion\""), "{body}");

    for (request, expected) in [
        ("{not json", "invalid JSON body"),
        (r#"{"messages":[{"role":"user","content":"hi"}],"temprature":1}"#, "unknown field `temprature`"),
        (r#"{"messages":[]}"#, "`messages` is empty"),
        (r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":0}"#, "`max_tokens` is 0"),
        (r#"{"messages":[{"role":"user","content":"hi"}],"top_p":3}"#, "`top_p` is 3"),
        (r#"{"messages":[{"role":"user","content":"hi"}],"n":2}"#, "`n` must be 1"),
    ] {
        let (status, body) = http(&addr, "POST", "/v1/chat/completions", request, key);
        assert_eq!(status, 400, "{request}: {body}");
        assert!(body.contains(expected) && body.contains("invalid_request_error"), "{request}: {body}");
    }
    let (status, _) = http(&addr, "GET", "/v2/nothing", "", key);
    assert_eq!(status, 404);

    // --queue 0: while one long request is generated, the next gets 429.
    // (The tiny model, greedy, never picks EOS after this chat prompt.) The
    // long request streams, so its first token says it holds the model:
    // no fixed wait, and no short request can get there first.
    let long = r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":3000,"stream":true}"#;
    let mut first = TcpStream::connect(&addr).unwrap();
    first.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer secret\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{long}",
        long.len()
    );
    first.write_all(request.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    // Bounded by the read timeout and by 64 KiB.
    while !String::from_utf8_lossy(&head).contains("\"content\"") && head.len() < 65_536 {
        let n = first.read(&mut byte).unwrap();
        assert_eq!(n, 1, "the stream ended early: {}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (status, refused) = http(&addr, "POST", "/v1/completions", r#"{"prompt":"a","max_tokens":1}"#, key);
    assert_eq!(status, 429, "a second request while the first streams: {refused}");
    assert!(refused.contains("busy") && refused.contains("--queue"), "{refused}");
}

#[test]
fn a_public_address_needs_allow_remote() {
    let output = common::blossom(&["serve", "--model", "tiny", "--listen", "0.0.0.0:0"]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--allow-remote"), "{stderr}");
}

#[test]
fn the_openai_client_chats_and_follows_a_live_data_dir() {
    let has_openai = Command::new("python3").args(["-c", "import openai"]).env("PYTHONPATH", common::python_path()).status().is_ok_and(|s| s.success());
    if !has_openai {
        common::skip_unless_ci("the openai Python package is missing from .deps/python");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Two adapters of the tiny model: round 0 of a "node", and the next round.
    for (name, iters) in [("round-0000", "2"), ("next", "4")] {
        let out = dir.path().join("trained").join(name);
        let output = common::blossom(&[
            "--set", "lora.num_layers=4", "train", "--model", "tiny", "--iters", iters, "--val-rows", "2", "--exact-match-rows", "1",
            "--adapter-path", out.to_str().unwrap(),
        ]);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    }
    // The server starts before the node has made its data directory.
    let data_dir = dir.path().join("node");
    let (_server, addr) = serve(&["--follow", data_dir.to_str().unwrap()]);
    std::fs::create_dir_all(data_dir.join("adapters/round-0000")).unwrap();
    for file in ["adapters.safetensors", "adapter_config.json"] {
        std::fs::copy(dir.path().join("trained/round-0000").join(file), data_dir.join("adapters/round-0000").join(file)).unwrap();
    }
    std::fs::write(data_dir.join("metrics.jsonl"), "{\"round\":1,\"average_hash\":\"00ff\"}\n").unwrap();
    let output = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/openai_client_check.py"))
        .args([&format!("http://{addr}/v1"), data_dir.to_str().unwrap(), dir.path().join("trained/next").to_str().unwrap()])
        .env("PYTHONPATH", common::python_path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("followed: now serving round 1 (00ff)") && stdout.ends_with("OK\n"), "{stdout}");
}
