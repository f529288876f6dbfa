//! `blossom-p2p doctor`: is this installation able to train?
//!
//! It reports the MLX version and device (with the GPU's name and memory where
//! MLX computes on one), the BLAS that serves CPU matmuls, measured matmul
//! rates (float32 1024³ on a CPU; float32 and bfloat16 8192³ on a GPU), and
//! whether the default model is present with the right hash; or, given
//! `--model` another model, whether it loads and runs here, in what
//! precision, in how much memory and how fast. Each problem comes with the command that fixes it, and
//! any problem makes the exit code 1. A slow matmul on a BLAS known to be fast
//! is only a warning: the installation is right and the machine is busy, which
//! no command fixes (the test suite runs doctor beside other processes).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use serde::Serialize;

use crate::default_model::{DEFAULT_MODEL_BLAKE3, ModelCheck, check_default_model};
use crate::mlx_env::{self, Backend, BlasKind, BlasLibrary, GpuInfo};

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// The model to check: the default model's file (its hash is checked),
    /// or any other model `--model` takes elsewhere (a GGUF file, a Hugging
    /// Face folder, `hf:org/name`): it is loaded and run.
    #[arg(long, value_name = "PATH|hf:ORG/NAME", default_value = crate::default_model::DEFAULT_MODEL_PATH)]
    pub model: PathBuf,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Below this a CPU build is on the reference BLAS (about 6 GFLOP/s); OpenBLAS
/// gives 150-300 on two cores. The margin absorbs a busy machine.
const MIN_CPU_GFLOPS: f64 = 20.0;

#[derive(Debug, Serialize)]
pub struct Report {
    pub mlx_version: String,
    pub device: &'static str,
    /// The GPU MLX computes on, if it does.
    pub gpu: Option<GpuInfo>,
    pub blas: Option<String>,
    pub blas_path: Option<String>,
    pub matmul_gflops: f64,
    pub matmul_size: i32,
    pub matmul_iterations: u32,
    /// bfloat16 at the same size, measured on a GPU only (a CPU has no fast bfloat16).
    pub matmul_bf16_gflops: Option<f64>,
    pub model_path: String,
    pub model_status: &'static str,
    /// How another model runs here (`--model` not the default model).
    pub model_run: Option<ModelRun>,
    pub problems: Vec<Problem>,
    /// Findings that do not fail the check.
    pub warnings: Vec<Problem>,
}

/// What loading and running a model here showed.
#[derive(Debug, Serialize)]
pub struct ModelRun {
    pub architecture: String,
    pub parameters: u64,
    /// The precision its weights are held in on this device.
    pub held_as: String,
    /// The weights' bytes as held.
    pub weights_bytes: u64,
    /// Greedy decoding: a 64-token prompt, then 16 tokens (median of 3).
    pub prompt_tokens_per_sec: f64,
    pub generation_tokens_per_sec: f64,
}

/// Prompt and generated tokens of the speed check.
const SPEED_PROMPT: u32 = 64;
const SPEED_TOKENS: u32 = 16;

#[derive(Debug, Serialize)]
pub struct Problem {
    pub what: String,
    pub fix: String,
}

/// Runs every check and collects the problems.
pub fn diagnose(model: &Path) -> anyhow::Result<Report> {
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let backend = mlx_env::backend();
    let blas = mlx_env::blas_library();
    let bench = mlx_env::matmul_limit(mlx_rs::Dtype::Float32)?;
    let bf16 = if backend == Backend::Cpu { None } else { Some(mlx_env::matmul_limit(mlx_rs::Dtype::Bfloat16)?) };
    let size = bench.size;

    if backend == Backend::Cpu {
        match &blas {
            Some(lib) if lib.kind == BlasKind::Reference => problems.push(Problem {
                what: format!("MLX's matmuls run on the slow reference BLAS ({})", lib.path),
                fix: "install OpenBLAS and rebuild: bash scripts/setup.sh (Debian package libopenblas0-pthread)"
                    .to_owned(),
            }),
            None => problems.push(Problem {
                what: "no BLAS provides cblas_sgemm in this process".to_owned(),
                fix: "rebuild after bash scripts/setup.sh".to_owned(),
            }),
            Some(_) => {}
        }
        if bench.gflops < MIN_CPU_GFLOPS {
            let findings = if slow_matmul_is_only_load(blas.as_ref()) { &mut warnings } else { &mut problems };
            findings.push(Problem {
                what: format!(
                    "float32 {size}³ matmul runs at {:.1} GFLOP/s, below the {MIN_CPU_GFLOPS} expected of a fast BLAS",
                    bench.gflops
                ),
                fix: "check that nothing else loads the CPU, then that OpenBLAS is linked (bash scripts/setup.sh)"
                    .to_owned(),
            });
        }
    }

    if !checks_hash(model) {
        let source = model.to_string_lossy();
        let (model_status, model_run) = match run_model(&source) {
            Ok(run) => ("loads and runs", Some(run)),
            Err(err) => {
                problems.push(Problem {
                    what: format!("{source} does not load: {err}"),
                    fix: "check the path; README's \"Models\" lists what loads (GGUF, Hugging Face and mlx-lm folders)".to_owned(),
                });
                ("does not load", None)
            }
        };
        return Ok(report(backend, blas, bench, bf16, model, model_status, model_run, problems, warnings));
    }
    let model_check = check_default_model(model);
    let model_status = match &model_check {
        ModelCheck::Verified { .. } => "present, blake3 matches",
        ModelCheck::Missing { .. } => "missing",
        ModelCheck::HashMismatch { .. } => "present, WRONG blake3",
        ModelCheck::Unreadable { .. } => "unreadable",
    };
    match &model_check {
        ModelCheck::Verified { .. } => {}
        ModelCheck::Missing { path } => problems.push(Problem {
            what: format!("the default model {} is missing", path.display()),
            fix: "fetch it: bash scripts/setup.sh --no-build".to_owned(),
        }),
        ModelCheck::HashMismatch { path, actual } => problems.push(Problem {
            what: format!(
                "{} has blake3 {actual}, expected {DEFAULT_MODEL_BLAKE3} (corrupt or a different file)",
                path.display()
            ),
            fix: format!("delete it and fetch it again: rm {} && bash scripts/setup.sh --no-build", path.display()),
        }),
        ModelCheck::Unreadable { path, error } => problems.push(Problem {
            what: format!("cannot read {}: {error}", path.display()),
            fix: "check the file's permissions".to_owned(),
        }),
    }

    Ok(report(backend, blas, bench, bf16, model, model_status, None, problems, warnings))
}

/// Whether `model` is checked as the default model's file, by its hash:
/// it has the default's name, or it is a missing file (reported missing,
/// with the command that fetches the default). Any other model is loaded
/// and run.
fn checks_hash(model: &Path) -> bool {
    let default = Path::new(crate::default_model::DEFAULT_MODEL_PATH);
    model.file_name() == default.file_name() || (!model.exists() && !model.to_string_lossy().starts_with("hf:"))
}

/// Loads `source` as `--quant auto` would here and measures greedy decoding.
fn run_model(source: &str) -> Result<ModelRun, crate::model::ModelError> {
    use crate::model::{LoadOptions, load_model};
    let loaded = load_model(source, &LoadOptions::default())?;
    let decoder = &loaded.decoder;
    let weights = decoder.weights()?.into_inner();
    let weights_bytes = weights.values().map(|a| a.nbytes() as u64).sum();
    let parameters = decoder.parameter_count();
    let held_as = match decoder.quantized_modules().first() {
        Some((_, group, bits)) => format!("{bits}-bit MLX affine groups of {group} (kept quantized)"),
        None if decoder.has_half_precision() => "float16/bfloat16 (as stored)".to_owned(),
        None if loaded.dequantized => "float32 (widened at load: faster on this device)".to_owned(),
        None => "float32".to_owned(),
    };
    let (prompt_tokens_per_sec, generation_tokens_per_sec) = crate::model::generate::measure_speed(decoder, &loaded.tokenizer, SPEED_PROMPT, SPEED_TOKENS, 3)?;
    Ok(ModelRun {
        architecture: decoder.args().model_type.clone(),
        parameters,
        held_as,
        weights_bytes,
        prompt_tokens_per_sec,
        generation_tokens_per_sec,
    })
}

#[allow(clippy::too_many_arguments)]
fn report(
    backend: Backend,
    blas: Option<BlasLibrary>,
    bench: mlx_env::MatmulBench,
    bf16: Option<mlx_env::MatmulBench>,
    model: &Path,
    model_status: &'static str,
    model_run: Option<ModelRun>,
    problems: Vec<Problem>,
    warnings: Vec<Problem>,
) -> Report {
    Report {
        mlx_version: mlx_env::mlx_version(),
        device: backend.name(),
        gpu: if backend == Backend::Cpu { None } else { mlx_env::gpu_info() },
        blas: blas.as_ref().map(|lib| lib.kind.name().to_owned()),
        blas_path: blas.map(|lib| lib.path),
        matmul_gflops: bench.gflops,
        matmul_size: bench.size,
        matmul_iterations: bench.iterations,
        matmul_bf16_gflops: bf16.map(|b| b.gflops),
        model_path: model.display().to_string(),
        model_status,
        model_run,
        problems,
        warnings,
    }
}

/// A slow matmul on OpenBLAS or Accelerate means a loaded machine, not a bad
/// installation; on any other BLAS it is the installation.
fn slow_matmul_is_only_load(blas: Option<&BlasLibrary>) -> bool {
    blas.is_some_and(|lib| matches!(lib.kind, BlasKind::OpenBlas | BlasKind::Accelerate))
}

impl Report {
    pub fn render_text(&self) -> String {
        let mut out = String::from("blossom-p2p doctor\n");
        let blas = match (&self.blas, &self.blas_path) {
            (Some(kind), Some(path)) => format!("{kind} ({path})"),
            _ => "none found".to_owned(),
        };
        out += &format!("  MLX      {} (device: {})\n", self.mlx_version, self.device);
        if let Some(gpu) = &self.gpu {
            let memory = gpu.memory_bytes.map(|b| format!(", {:.1} GiB", b as f64 / (1u64 << 30) as f64)).unwrap_or_default();
            let architecture = gpu.architecture.as_ref().map(|a| format!(", {a}")).unwrap_or_default();
            out += &format!("  GPU      {}{architecture}{memory}\n", gpu.name);
        }
        out += &format!("  BLAS     {blas}\n");
        out += &format!(
            "  matmul   {:.1} GFLOP/s (float32 {n}x{n}x{n}, best of {})\n",
            self.matmul_gflops,
            self.matmul_iterations,
            n = self.matmul_size
        );
        if let Some(bf16) = self.matmul_bf16_gflops {
            out += &format!("  matmul   {bf16:.1} GFLOP/s (bfloat16 {n}x{n}x{n})\n", n = self.matmul_size);
        }
        out += &format!("  model    {}: {}\n", self.model_path, self.model_status);
        if let Some(run) = &self.model_run {
            out += &format!(
                "           {}, {:.0}M parameters, held as {}, {:.0} MB of weights\n",
                run.architecture,
                run.parameters as f64 / 1e6,
                run.held_as,
                run.weights_bytes as f64 / 1e6
            );
            out += &format!(
                "           prompt {:.1} tokens/s, generation {:.1} tokens/s (greedy, {SPEED_PROMPT}-token prompt, {SPEED_TOKENS} tokens)\n",
                run.prompt_tokens_per_sec, run.generation_tokens_per_sec
            );
        }
        for warning in &self.warnings {
            out += &format!("warning: {}\n    fix: {}\n", warning.what, warning.fix);
        }
        if self.problems.is_empty() {
            out += "all checks passed\n";
        } else {
            for problem in &self.problems {
                out += &format!("problem: {}\n    fix: {}\n", problem.what, problem.fix);
            }
        }
        out
    }
}

pub fn run(args: &DoctorArgs) -> ExitCode {
    let report = match diagnose(&args.model) {
        Ok(report) => report,
        Err(err) => {
            eprintln!("error: MLX failed while running the checks: {err:#}\n    fix: run bash scripts/setup.sh and rebuild");
            return ExitCode::FAILURE;
        }
    };
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(json) => println!("{json}"),
            Err(err) => {
                eprintln!("error: cannot render the report as JSON: {err}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", report.render_text());
    }
    if report.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_matmul_fails_the_check_only_when_the_blas_is_not_a_fast_one() {
        let library = |kind| BlasLibrary { kind, path: "/lib/libblas.so".to_owned() };
        assert!(slow_matmul_is_only_load(Some(&library(BlasKind::OpenBlas))));
        assert!(slow_matmul_is_only_load(Some(&library(BlasKind::Accelerate))));
        assert!(!slow_matmul_is_only_load(Some(&library(BlasKind::Reference))));
        assert!(!slow_matmul_is_only_load(Some(&library(BlasKind::Other))));
        assert!(!slow_matmul_is_only_load(None));
    }
}
