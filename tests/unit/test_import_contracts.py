"""The import contracts between Heedful's packages, checked over the source tree (every `import`, at module
level, inside functions and under `TYPE_CHECKING` alike), and shown to catch a planted violation.

The layers, bottom up (docs/architecture.md): the kernel (`kernel`: paths, settings, prompt formats),
storage, the engine (`server.engine`), then learning (`personalization`) and the language server
(`lsp_handlers`) side by side, then the composition root (the rest of `server`), then the tools
(`tools`: evaluation, report). A layer imports only from layers below it.
"""

from __future__ import annotations

import ast
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("kernel", "storage", "adapters", "server", "lsp_handlers", "personalization", "tools")
NOT_SHIPPED = ("bench", "tests", "scripts")


@dataclass(frozen=True)
class Contract:
    """Modules under any of `sources` (but not under `exempt`) import nothing under `forbidden` except
    what is under `allowed`. Names match a module and everything under it (`server` matches
    `server.cli`, not `serverless`)."""

    name: str
    sources: tuple[str, ...]
    forbidden: tuple[str, ...]
    allowed: tuple[str, ...] = ()
    exempt: tuple[str, ...] = ()


CONTRACTS = (
    Contract("the kernel imports nothing of Heedful", ("kernel",), PACKAGES[1:] + NOT_SHIPPED),
    Contract(
        "storage builds on the kernel alone (it is handed plain values, not settings)",
        ("storage",),
        ("adapters", "server", "lsp_handlers", "personalization", "tools", *NOT_SHIPPED),
    ),
    Contract(
        "the engine builds on the kernel and the model files alone",
        ("server.engine",),
        ("storage", "adapters", "server", "lsp_handlers", "personalization", "tools", *NOT_SHIPPED),
        allowed=("server.engine", "server.model_prep"),
    ),
    Contract(
        "the adapter lifecycle builds on the kernel, storage and the engine",
        ("adapters",),
        ("server", "lsp_handlers", "personalization", "tools", *NOT_SHIPPED),
        allowed=("server.engine",),
    ),
    Contract(
        "learning uses storage and the engine, never the language server or the composition root",
        ("personalization",),
        ("lsp_handlers", "server", "tools", *NOT_SHIPPED),
        allowed=("server.engine",),
    ),
    Contract(
        "the language server does not import learning, the tools or the entry points",
        ("lsp_handlers",),
        ("personalization", "tools", "server.cli", "server.serve", *NOT_SHIPPED),
    ),
    Contract(
        "queries live in storage: elsewhere a database session is only handed on",
        ("kernel", "adapters", "server", "lsp_handlers", "personalization", "tools"),
        ("sqlalchemy",),
        allowed=("sqlalchemy.ext.asyncio.AsyncSession", "sqlalchemy.engine.make_url"),
    ),
    Contract(
        "the tools are imported only by the entry points that run them",
        PACKAGES,
        ("tools", *NOT_SHIPPED),
        exempt=("tools", "server.cli", "server.serve"),
    ),
)


def under(module: str, names: tuple[str, ...]) -> bool:
    return any(module == n or module.startswith(n + ".") for n in names)


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(root: Path, path: Path) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import in a file; `from a import b` yields `a.b` (b may be a
    module), relative imports are resolved against the file's package."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(root, path) if path.name == "__init__.py" else module_name(root, path).rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                yield (f"{base}.{alias.name}" if alias.name != "*" else base), node.lineno


@dataclass(frozen=True)
class Violation:
    contract: str
    file: str
    line: int
    imported: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line} imports {self.imported}: breaks '{self.contract}'"


def violations(root: Path, contracts: tuple[Contract, ...] = CONTRACTS) -> list[Violation]:
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            source = module_name(root, path)
            for imported, line in imports_of(root, path):
                for c in contracts:
                    if not under(source, c.sources) or under(source, c.exempt):
                        continue
                    if under(imported, c.forbidden) and not under(imported, c.allowed):
                        found.append(Violation(c.name, str(path.relative_to(root)), line, imported))
    return found


def test_the_source_tree_keeps_every_import_contract() -> None:
    assert [str(v) for v in violations(ROOT)] == []


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the packages' sources, to plant violations in."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def plant(path: Path, text: str) -> None:
    path.write_text(path.read_text(encoding="utf-8") + text, encoding="utf-8")


TYPE_ONLY = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lsp_handlers import context\n"
IN_A_FUNCTION = "\n\ndef f() -> None:\n    import storage.models\n"
AFTER_A_KERNEL_IMPORT = "from kernel.settings import Settings\nfrom server.runtime import Services\n"


@pytest.mark.parametrize(
    ("file", "planted", "contract", "imported"),
    [
        ("storage/db.py", AFTER_A_KERNEL_IMPORT, 1, "server.runtime.Services"),
        ("kernel/paths.py", IN_A_FUNCTION, 0, "storage.models"),
        ("personalization/worker.py", TYPE_ONLY, 4, "lsp_handlers.context"),
        ("lsp_handlers/server.py", "from personalization.trainer import Sample\n", 5, "personalization.trainer.Sample"),
        ("server/engine/base.py", "from ..registry import AdapterRegistry\n", 2, "server.registry.AdapterRegistry"),
        (
            "adapters/lifecycle.py",
            "from personalization.gates import GateResult\n",
            3,
            "personalization.gates.GateResult",
        ),
        ("storage/adapter_files.py", "from adapters import lifecycle\n", 1, "adapters.lifecycle"),
        ("server/guards.py", "from tools import report\n", 7, "tools.report"),
        ("personalization/judge.py", "from sqlalchemy import select\n", 6, "sqlalchemy.select"),
        ("server/engine/__init__.py", "from .. import cli\n", 2, "server.cli"),
    ],
)
def test_a_planted_import_is_reported_with_its_file_line_and_contract(
    tree: Path, file: str, planted: str, contract: int, imported: str
) -> None:
    lines = (tree / file).read_text(encoding="utf-8").count("\n")
    plant(tree / file, planted)
    (found,) = violations(tree)
    assert (found.file, found.imported, found.contract) == (file, imported, CONTRACTS[contract].name)
    assert found.line > lines
    assert str(found) == f"{file}:{found.line} imports {imported}: breaks '{CONTRACTS[contract].name}'"


def test_what_a_contract_allows_or_exempts_is_not_reported(tree: Path) -> None:
    plant(tree / "personalization/prm.py", "from server.engine.tokens import LocalTokenizer\n")  # allowed
    plant(tree / "server/cli.py", "from tools.evaluation import EvalPlan\n")  # exempt source
    plant(tree / "storage/models.py", "import serverless_thing\n")  # a name that only starts like a package
    assert violations(tree) == []


def test_every_module_imports() -> None:
    """A name only imported for type checking but used at run time (a type alias, a default) fails here,
    not in the first editor that starts the server."""
    import importlib

    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" not in path.parts:
                importlib.import_module(module_name(ROOT, path))
