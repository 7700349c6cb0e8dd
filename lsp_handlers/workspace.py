"""The workspace folders an editor named, and what the completion prompt may read of them.

At `initialize` the editor says which folders it has open (`workspaceFolders`, else `rootUri`); only
`file:` folders count. Cross-file context (`lsp_handlers.crossfile`) takes its snippets from the
connection's other open documents and from the Python files the current one imports; those are read from
disk only when they are inside one of these folders: a listing of each folder's Python files (hidden
folders, virtual environments, `node_modules`, `__pycache__`, build output skipped; at most `MAX_FILES`,
refreshed after `LISTING_TTL_S`) is what a path is looked up in, so nothing outside it (no `..`, no link
that leaves the folder) is ever opened. Files over `MAX_FILE_BYTES` or not UTF-8 are skipped. What was
read is kept by size and modification time, so a file is read again only when it changed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from lsprotocol import types

from lsp_handlers.crossfile import Neighbours, Source, imported_files

log = logging.getLogger(__name__)

MAX_FILES = 20_000  # Python files listed per folder (a monorepo beyond it is listed in part)
MAX_FILE_BYTES = 256 * 1024
LISTING_TTL_S = 30.0
MAX_SOURCES = 8  # imported files, and open documents, one prompt's snippets are taken from (each at most)
SKIPPED_DIRS = frozenset({"node_modules", "__pycache__", "venv", "env", "build", "dist", "site-packages"})


def path_of_uri(uri: str) -> Path | None:
    """The local path of a `file:` URI, or None for any other scheme."""
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        return None
    return Path(unquote(parsed.path))


@dataclass(slots=True)
class _Listing:
    files: frozenset[str]
    at: float


@dataclass(slots=True)
class Workspace:
    """The folders of one connection (see the module docstring)."""

    folders: tuple[Path, ...] = ()
    _listings: dict[Path, _Listing] = field(default_factory=dict)
    _texts: dict[Path, tuple[int, int, str | None]] = field(default_factory=dict)  # path -> (size, mtime, text)

    @classmethod
    def from_initialize(cls, params: types.InitializeParams) -> Workspace:
        uris = [f.uri for f in params.workspace_folders or []]
        if not uris and params.root_uri:
            uris = [params.root_uri]
        folders = []
        for uri in uris:
            path = path_of_uri(uri)
            if path is not None and path.is_absolute():
                folders.append(Path(os.path.realpath(path)))
        return cls(tuple(dict.fromkeys(folders)))

    def locate(self, uri: str) -> tuple[Path, str] | None:
        """(the folder, the `/`-separated path inside it) of a document, or None when it is in none of them."""
        path = path_of_uri(uri)
        if path is None:
            return None
        real = Path(os.path.realpath(path))
        for folder in sorted(self.folders, key=lambda f: len(f.parts), reverse=True):  # the innermost first
            if real.is_relative_to(folder):
                return folder, real.relative_to(folder).as_posix()
        return None

    def python_files(self, folder: Path) -> frozenset[str]:
        """The folder's Python files (`/`-separated, relative to it), listed at most every `LISTING_TTL_S`."""
        now = time.monotonic()
        listing = self._listings.get(folder)
        if listing is None or now - listing.at > LISTING_TTL_S:
            listing = _Listing(frozenset(_list_python(folder, MAX_FILES)), now)
            self._listings[folder] = listing
        return listing.files

    def read(self, folder: Path, relative: str) -> str | None:
        """The text of a listed file of `folder`, or None (not listed, too large, unreadable, not UTF-8)."""
        if folder not in self.folders or relative not in self.python_files(folder):
            return None
        path = folder / relative
        if not Path(os.path.realpath(path)).is_relative_to(folder):  # a link that leaves the folder
            return None
        try:
            st = path.stat()
        except OSError:
            return None
        cached = self._texts.get(path)
        if cached is not None and cached[:2] == (st.st_size, st.st_mtime_ns):
            return cached[2]
        text: str | None = None
        if st.st_size <= MAX_FILE_BYTES:
            try:
                text = path.read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                text = None
        self._texts[path] = (st.st_size, st.st_mtime_ns, text)
        return text

    def neighbours(
        self,
        uri: str,
        text: str,
        language_id: str | None,
        open_docs: Iterable[tuple[str, str]],
        *,
        imports: bool = True,
    ) -> Neighbours | None:
        """Where `uri` (whose text is `text`) is in its workspace folder and the files its snippets may come
        from: the connection's other open documents in the same folder (`open_docs`: (uri, text); the first
        `MAX_SOURCES`), then, with `imports`, the first `MAX_SOURCES` Python files it imports that are not
        open (an open one is already there, with the text the developer sees). None outside the folders or
        with no such file. Reads the disk: call it off the event loop."""
        here = self.locate(uri)
        if here is None:
            return None
        folder, path = here
        found: dict[str, Source] = {}
        for other_uri, other_text in open_docs:
            where = self.locate(other_uri)
            if where is None or where[0] != folder or where[1] == path:
                continue
            if len(found) < MAX_SOURCES:
                found[where[1]] = Source(where[1], other_text, "open")
        if imports and (path.endswith(".py") or language_id == "python"):
            added = 0
            for imported in imported_files(text, path, self.python_files(folder)):
                if added >= MAX_SOURCES:
                    break
                if imported in found:
                    continue
                source_text = self.read(folder, imported)
                if source_text:
                    found[imported] = Source(imported, source_text, "import")
                    added += 1
        return Neighbours(path, tuple(found.values())) if found else None


def _list_python(folder: Path, limit: int) -> list[str]:
    out: list[str] = []
    for root, dirs, files in os.walk(folder):  # does not follow links to folders
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIPPED_DIRS)
        rel = Path(root).relative_to(folder)
        for name in sorted(files):
            if name.endswith(".py"):
                out.append((rel / name).as_posix())
                if len(out) >= limit:
                    log.info("workspace folder %s has more than %d Python files: the rest is not listed", folder, limit)
                    return out
    return out
