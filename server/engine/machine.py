"""Facts about this machine that results depend on (the CPU decides which kernels run)."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """This machine's CPU model name, as /proc/cpuinfo gives it (the platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
