"""Where Heedful keeps its files: the data dir (database, models, adapters) and the download cache.

Both live outside any source checkout so that a fresh clone reuses a model prepared earlier.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DEFAULT_MODEL_DIRNAME = "Qwen2.5-Coder-0.5B-Instruct"  # the default of `server.model_prep.MODELS`


def data_dir() -> Path:
    """`HEEDFUL_DATA_DIR`, else `$XDG_DATA_HOME/heedful` (default `~/.local/share/heedful`)."""
    explicit = os.environ.get("HEEDFUL_DATA_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg).expanduser() / "heedful"


def cache_dir() -> Path:
    """`HEEDFUL_CACHE_DIR`, else `$XDG_CACHE_HOME/heedful`: downloads that can be fetched again."""
    explicit = os.environ.get("HEEDFUL_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "heedful"


def model_dir(title: str) -> Path:
    """Where `heedful model prepare` puts a model it knows (safetensors), by the model's own name."""
    return data_dir() / "models" / title


def default_model_dir() -> Path:
    """Where `heedful model prepare` puts the default model (Qwen2.5-Coder-0.5B-Instruct, safetensors)."""
    return model_dir(DEFAULT_MODEL_DIRNAME)


def config_path() -> Path | None:
    """The global settings file named by `HEEDFUL_CONFIG`, if any."""
    explicit = os.environ.get("HEEDFUL_CONFIG")
    return Path(explicit).expanduser() if explicit else None


def heedful_command(config: Path | None, *args: str) -> list[str]:
    """The command line that runs this Heedful's CLI with `config` as its settings file (None: none given)."""
    return [sys.executable, "-m", "server.cli", *(["--config", str(config)] if config is not None else []), *args]
