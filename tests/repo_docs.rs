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
