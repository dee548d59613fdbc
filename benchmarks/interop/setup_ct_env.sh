#!/usr/bin/env bash
# Create a separate virtualenv holding circuit-tracer 0.5.0 for side-by-side checks.
#
# circuit-tracer 0.5.0 pins transformers<=4.57.3 and huggingface-hub<1.0, which
# conflicts with the main environment (transformers 5.x), so it lives in its own venv.
#
# Usage: benchmarks/interop/setup_ct_env.sh        (venv at ${CT_VENV:-<repo>/.venv-ct})
# Env:   CT_VENV  venv location; UV  uv executable (default: uv on PATH, else ~/.local/bin/uv)
# Idempotent: does nothing if the venv exists and `import circuit_tracer` works there.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${CT_VENV:-$repo/.venv-ct}"
py="$venv/bin/python"

TORCH_SPEC="torch==2.15.0"          # same as the main env, so uv's cache is shared
CT_SPEC="circuit-tracer==0.5.0"
NNSIGHT_SPEC="nnsight==0.6.3"       # an unpinned resolve picks 0.8.x, which breaks circuit-tracer's nnsight backend

if [[ -n "${UV:-}" ]]; then
    uv="$UV"
elif command -v uv >/dev/null 2>&1; then
    uv="$(command -v uv)"
elif [[ -x "$HOME/.local/bin/uv" ]]; then
    uv="$HOME/.local/bin/uv"
else
    echo "setup_ct_env: uv not found (set UV=/path/to/uv)" >&2
    exit 1
fi

if [[ -x "$py" ]] && "$py" -c "import circuit_tracer" >/dev/null 2>&1; then
    echo "setup_ct_env: $venv already has circuit_tracer; nothing to do"
    exit 0
fi

t0=$SECONDS
step() {  # step LABEL CMD... : run a command and print how long it took
    local label="$1"; shift
    local s=$SECONDS
    echo "setup_ct_env: $label ..."
    if ! "$@"; then
        echo "setup_ct_env: FAILED: $label" >&2
        exit 1
    fi
    echo "setup_ct_env: $label done in $((SECONDS - s)) s"
}

if [[ ! -x "$py" ]]; then
    step "create venv $venv (python 3.11)" "$uv" venv -p 3.11 "$venv"
fi
step "install $TORCH_SPEC" "$uv" pip install -p "$py" "$TORCH_SPEC"
step "install $CT_SPEC" "$uv" pip install -p "$py" "$TORCH_SPEC" "$CT_SPEC"
step "install $NNSIGHT_SPEC" "$uv" pip install -p "$py" "$TORCH_SPEC" "$CT_SPEC" "$NNSIGHT_SPEC"

step "check imports" "$py" - <<'PY'
import importlib.metadata as md
import circuit_tracer  # noqa: F401
for name in ("circuit-tracer", "torch", "transformer-lens", "transformers", "nnsight", "huggingface-hub"):
    try:
        print(f"  {name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name}: not installed")
PY
echo "setup_ct_env: total $((SECONDS - t0)) s"
