"""The llama.cpp peer of bench.latency, run in its own process with llama-cpp-python on PYTHONPATH.

Reads a job from standard input: {"gguf": path, "prompts": [[token ids]], "max_tokens": n, "stop": [...]};
completes every prompt greedily (one context, `LLAMA_THREADS` threads) and prints
{"times": [seconds], "tokens": [new tokens]}.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    from llama_cpp import Llama  # type: ignore[import-not-found]

    job = json.load(sys.stdin)
    threads = int(os.environ.get("LLAMA_THREADS", "2"))
    llm = Llama(model_path=job["gguf"], n_ctx=2048, n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)
    times: list[float] = []
    tokens: list[int] = []
    for ids in job["prompts"]:
        llm.reset()  # no prefix reuse from the previous prompt: each request starts cold, as the others do
        start = time.perf_counter()
        out = llm.create_completion(ids, max_tokens=job["max_tokens"], temperature=0.0, top_k=1, stop=job["stop"])
        times.append(time.perf_counter() - start)
        tokens.append(out["usage"]["completion_tokens"])
    json.dump({"times": times, "tokens": tokens}, sys.stdout)


if __name__ == "__main__":
    main()
