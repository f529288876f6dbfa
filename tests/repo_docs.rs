//! The README's commands are the project's contract with its users and CI.

const README: &str = include_str!("../README.md");
const CI_RUN: &str = include_str!("../.ci/run");

#[test]
fn ci_runs_the_readme_test_command() {
    let command = "bash scripts/setup.sh --no-build --tests && cargo test --workspace";
    assert!(README.contains(command), "README.md lost its test command");
    assert!(
        CI_RUN.lines().any(|line| line.trim() == command),
        ".ci/run does not run the README's test command"
    );
}

#[test]
fn readme_gives_the_setup_and_main_job_command() {
    assert!(README.contains("bash scripts/setup.sh && cargo run --quiet -- simulate --nodes 4 --rounds 4"));
}

/// The `crate::` modules the Rust files under `src/<dir>` import.
fn imports_of(dir: &str) -> Vec<(String, String)> {
    fn walk(path: &std::path::Path, out: &mut Vec<(String, String)>) {
        let entries = std::fs::read_dir(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for (at, _) in text.match_indices("crate::") {
                    let module: String = text[at + 7..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                    out.push((path.display().to_string(), module));
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(dir), &mut out);
    out
}

/// docs/ARCHITECTURE.md ("Layers"): the network never imports the trainer,
/// the trainer never imports the network, averaging imports nothing, and
/// the wire format sits below the store and the network.
#[test]
fn layers_import_only_what_the_architecture_allows() {
    let architecture = include_str!("../docs/ARCHITECTURE.md");
    assert!(architecture.contains("## Layers"), "docs/ARCHITECTURE.md lost its Layers section");
    let allowed: &[(&str, &[&str])] = &[
        ("aggregate", &[]),
        ("wire", &["aggregate"]),
        ("store", &["wire", "durable"]),
        ("p2p", &["wire", "store"]),
        ("train", &["model", "data", "config", "rng", "durable", "mlx_env"]),
        ("model", &["mlx_env", "hub", "rng"]),
        ("data", &["hub", "rng", "model"]),
    ];
    let mut wrong = Vec::new();
    for (layer, may) in allowed {
        for (file, module) in imports_of(layer) {
            if module != *layer && !may.contains(&module.as_str()) {
                wrong.push(format!("{file} imports crate::{module}"));
            }
        }
    }
    assert!(wrong.is_empty(), "imports across layers that docs/ARCHITECTURE.md does not allow:\n{}", wrong.join("\n"));
}

#[test]
fn the_repository_explains_itself_without_files_outside_it() {
    for (name, text) in [
        ("README.md", README),
        ("docs/ARCHITECTURE.md", include_str!("../docs/ARCHITECTURE.md")),
        ("docs/PROTOCOL.md", include_str!("../docs/PROTOCOL.md")),
        ("docs/SECURITY.md", include_str!("../docs/SECURITY.md")),
        ("docs/MLX_ON_LINUX.md", include_str!("../docs/MLX_ON_LINUX.md")),
        ("src/lib.rs", include_str!("../src/lib.rs")),
        ("build.rs", include_str!("../build.rs")),
        (".cargo/config.toml", include_str!("../.cargo/config.toml")),
    ] {
        assert!(!text.contains("../shared"), "{name} sends the reader outside the repository");
    }
}

#[test]
fn ci_checks_the_relay_build_without_mlx() {
    assert!(CI_RUN.lines().any(|line| line.trim() == "cargo check --no-default-features"), ".ci/run does not check the relay build");
    assert!(README.contains("cargo build --release --no-default-features"), "README.md does not say how to build a relay");
}
