//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test binary uses its own subset

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A Hugging Face cache in a temporary folder with one repository
/// (`models--org--name` or `datasets--org--name`) whose `main` points at an
/// empty snapshot folder, returned for the test to fill.
pub fn fake_hub_cache(kind: &str, org: &str, name: &str) -> (tempfile::TempDir, PathBuf) {
    let cache = tempfile::tempdir().expect("tempdir");
    let repo = cache.path().join(format!("{kind}--{org}--{name}"));
    std::fs::create_dir_all(repo.join("refs")).expect("refs");
    std::fs::write(repo.join("refs/main"), "0123abcd").expect("ref");
    let snapshot = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snapshot).expect("snapshot");
    (cache, snapshot)
}

/// Runs the binary offline against `cache`.
pub fn run_offline(cache: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_blossom-p2p"))
        .args(args)
        .env("HF_HUB_CACHE", cache)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run blossom-p2p")
}

/// `hf:blossom-test/absent` must fail with exit code 2, naming the repository and the offline mode.
pub fn assert_absent_repo_is_a_clear_error(output: &Output) {
    assert_eq!(output.status.code(), Some(2));
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("hf:blossom-test/absent") && err.contains("HF_HUB_OFFLINE"), "{err}");
}

/// A test whose tool (a browser, a Python package) is missing may skip on a
/// developer's machine, saying so, but never in CI: `.ci/run` sets `CI`, and
/// there a missing tool fails the test.
pub fn skip_unless_ci(reason: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{reason}; CI must have it (bash scripts/setup.sh --tests installs it)");
    }
    eprintln!("skipped: {reason} (bash scripts/setup.sh --tests installs it)");
}

/// The folder where `scripts/setup.sh` installs the Python packages the
/// tests use (openai, gguf, mlx-lm).
pub fn python_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".deps/python")
}

/// A libp2p node's options for tests: TCP on 127.0.0.1 (port chosen by the
/// OS), no mDNS, no relay, its store in `store_dir`.
pub fn loopback_options(store_dir: PathBuf, bootstrap: Vec<libp2p::Multiaddr>) -> blossom_p2p::p2p::network::NetworkOptions {
    blossom_p2p::p2p::network::NetworkOptions {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("a multiaddr")],
        bootstrap,
        external: vec![],
        mdns: false,
        relay_server: None,
        hole_punching: true,
        store_dir,
        store_quota: 1 << 30,
        limits: blossom_p2p::wire::codec::Limits::default(),
        psk: None,
        mesh_n: None,
        slice_owners: 2,
        transport: blossom_p2p::p2p::network::TransportKind::Internet,
        allowed_peers: None,
    }
}

/// Runs the binary from the repository root (where `models/` is).
pub fn blossom(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_blossom-p2p"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run blossom-p2p")
}

/// A running node process; killed (SIGKILL) when dropped. Its stdout and
/// stderr lines arrive on one channel.
pub struct Node {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// The last lines read, for failure messages.
    seen: std::cell::RefCell<std::collections::VecDeque<String>>,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends each line `stream` gives to `tx`, on a thread of its own.
pub fn forward_lines(stream: impl Read + Send + 'static, tx: mpsc::Sender<String>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
}

impl Node {
    pub fn spawn(args: &[&str]) -> Node {
        Self::spawn_with_env(args, &[])
    }

    pub fn spawn_with_env(args: &[&str], env: &[(&str, &str)]) -> Node {
        let mut child = Command::new(env!("CARGO_BIN_EXE_blossom-p2p"))
            .args(["-q", "--set", "network.mdns=false"])
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start a node");
        let (tx, lines) = mpsc::channel();
        forward_lines(child.stdout.take().expect("piped stdout"), tx.clone());
        forward_lines(child.stderr.take().expect("piped stderr"), tx);
        Node {
            child,
            lines,
            seen: Default::default(),
        }
    }

    /// The first output line containing `needle`, within 60 s.
    pub fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let mut seen = self.seen.borrow_mut();
                    seen.push_back(line.clone());
                    if seen.len() > 40 {
                        seen.pop_front();
                    }
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => break,
            }
        }
        let seen: Vec<String> = self.seen.borrow().iter().cloned().collect();
        panic!("no line with {needle:?} within 60 s; the last lines:\n{}", seen.join("\n"));
    }

    /// `kill -9`: the process gets no chance to clean up.
    pub fn kill_9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }

    /// Waits (up to 60 s) for the process to exit by itself.
    pub fn exit_code(mut self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the node did not exit within 60 s");
    }
}
