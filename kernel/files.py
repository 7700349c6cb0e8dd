"""Durable files: a file's SHA-256, and the fsyncs that make a write survive a crash (the file's data,
then the directory entry that names it). Used wherever Heedful writes what it must find whole again:
prepared models, published adapters, the PRM head."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def fsync_file(path: Path) -> None:
    with path.open("rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    """Make the names a directory holds durable (after files were created, renamed or removed in it)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Every file directly in `root`, then `root` itself."""
    for file in root.iterdir():
        if file.is_file():
            fsync_file(file)
    fsync_dir(root)


def fsync_replace(tmp: Path, final: Path) -> None:
    """Put a fully written `tmp` in place of `final` atomically, its data on disk first."""
    fsync_file(tmp)
    os.replace(tmp, final)
