"""Logging for every Heedful command: to standard error or a file, never to stdout.

In stdio mode stdout carries the LSP protocol, so nothing else may ever write there.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str = "INFO", file: str | Path | None = None) -> None:
    handler: logging.Handler
    if file:
        Path(file).expanduser().parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(Path(file).expanduser(), encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # vLLM configures its own logger to stdout unless told otherwise; keep it on our handler.
    for name in ("vllm",):
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.propagate = False
