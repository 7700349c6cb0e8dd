"""Heedful's server side: the inference engine (`server.engine`, on the kernel alone), adapter serving and
guards, and the composition root: the CLI, `heedful serve`, the process wiring (`runtime`)."""

import os

__version__ = "0.1.0"

# vLLM logs to stdout by default; in stdio mode stdout is the LSP protocol. Set before vLLM is imported
# anywhere (its spawned workers inherit the environment).
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
