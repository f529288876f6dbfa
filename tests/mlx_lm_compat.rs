//! `export` output must load in Python mlx-lm and answer as we do. The check
//! lives in scripts/check_mlx_lm_export.sh, which skips when mlx-lm is not
//! installed (set MLX_LM_PYTHON to a Python with mlx-lm 0.32.2 to run it).

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
    assert!(stdout.contains("SKIP") || stdout.matches("same answer").count() == 3, "{stdout}");
}
