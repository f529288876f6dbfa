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

/// Every Rust file under `src/`, with its path relative to `src/`.
fn sources() -> Vec<(std::path::PathBuf, String)> {
    fn walk(dir: &std::path::Path, root: &std::path::Path, out: &mut Vec<(std::path::PathBuf, String)>) {
        for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, root, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                out.push((path.strip_prefix(root).unwrap().to_path_buf(), text));
            }
        }
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = Vec::new();
    walk(&root, &root, &mut out);
    out
}

/// One idea a file: none grows past about 800 lines, its tests aside, so a
/// reader finds a phase or a protocol in a file of its own
/// (docs/ARCHITECTURE.md, "Inside the two largest rooms").
#[test]
fn no_source_file_is_over_800_lines_tests_aside() {
    let long: Vec<String> = sources()
        .into_iter()
        .map(|(path, text)| (path, text.split("#[cfg(test)]").next().unwrap_or_default().lines().count()))
        .filter(|(_, lines)| *lines > 800)
        .map(|(path, lines)| format!("{}: {lines} lines", path.display()))
        .collect();
    assert!(long.is_empty(), "files to split:\n{}", long.join("\n"));
}

/// No two files of one folder import each other (directly or round a
/// longer circle): what both need moves down a layer.
#[test]
fn no_import_circles_between_files_of_a_folder() {
    let sources = sources();
    // Folder → its files (not mod.rs) → the siblings each imports.
    let mut folders: std::collections::BTreeMap<std::path::PathBuf, std::collections::BTreeMap<String, std::collections::BTreeSet<String>>> = Default::default();
    for (path, _) in &sources {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if name != "mod" && name != "lib" && name != "main" {
            folders.entry(path.parent().unwrap().to_path_buf()).or_default().insert(name, Default::default());
        }
    }
    for (path, text) in &sources {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let folder = path.parent().unwrap().to_path_buf();
        let Some(siblings) = folders.get(&folder) else { continue };
        let names: Vec<String> = siblings.keys().cloned().collect();
        if !names.contains(&name) {
            continue;
        }
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let module_path: String = folder.iter().map(|c| c.to_string_lossy().into_owned()).collect::<Vec<_>>().join("::");
        let in_crate = if module_path.is_empty() { "crate::".to_owned() } else { format!("crate::{module_path}::") };
        let mut imported = std::collections::BTreeSet::new();
        for prefix in [in_crate, "super::".to_owned()] {
            for (at, _) in code.match_indices(&prefix) {
                let rest = &code[at + prefix.len()..];
                // `super::{a, b::C}` names several.
                let named: Vec<&str> = match rest.strip_prefix('{') {
                    Some(list) => list.split('}').next().unwrap_or_default().split(',').collect(),
                    None => vec![rest],
                };
                for item in named {
                    let module: String = item.trim().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                    if names.contains(&module) && module != name {
                        imported.insert(module);
                    }
                }
            }
        }
        folders.get_mut(&folder).unwrap().insert(name, imported);
    }
    let mut circles = Vec::new();
    for (folder, files) in &folders {
        for start in files.keys() {
            // Depth-first from `start`: a path back to it is a circle.
            let mut stack = vec![(start.clone(), vec![start.clone()])];
            let mut seen = std::collections::BTreeSet::new();
            while let Some((file, path)) = stack.pop() {
                for next in &files[&file] {
                    if next == start {
                        circles.push(format!("{}: {} -> {start}", folder.display(), path.join(" -> ")));
                    } else if seen.insert(next.clone()) {
                        stack.push((next.clone(), [path.clone(), vec![next.clone()]].concat()));
                    }
                }
            }
        }
    }
    circles.sort();
    circles.dedup();
    assert!(circles.is_empty(), "import circles:\n{}", circles.join("\n"));
}
