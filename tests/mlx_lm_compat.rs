//! `export` output must load in Python mlx-lm and answer as we do. The check
//! lives in scripts/check_mlx_lm_export.sh; it uses the mlx-lm that
//! `scripts/setup.sh --tests` installs into .deps/python, and skips without
//! it only outside CI.

use std::process::Command;

#[test]
fn exported_default_model_answers_the_same_in_mlx_lm() {
    let output = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/check_mlx_lm_export.sh"))
        .env("BLOSSOM_BIN", env!("CARGO_BIN_EXE_blossom-p2p"))
        .output()
        .expect("run the check script");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    if stdout.contains("SKIP") {
        assert!(std::env::var_os("CI").is_none(), "the check skipped in CI: {stdout}");
        return;
    }
    assert_eq!(stdout.matches("same answer").count(), 3, "{stdout}");
}
