"""Heedful's server side: CLI, settings, process wiring, the inference engine and adapter handling."""

import os

__version__ = "0.1.0"

# vLLM logs to stdout by default; in stdio mode stdout is the LSP protocol. Set before vLLM is imported
# anywhere (its spawned workers inherit the environment).
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
