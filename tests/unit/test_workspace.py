"""What cross-file context may read of a workspace: only listed Python files inside the folders the editor
named, open documents before imports, on hand-made folders."""

from __future__ import annotations

import os
from pathlib import Path

from lsprotocol import types

from lsp_handlers import workspace as ws
from lsp_handlers.workspace import Workspace


def make_tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def params(*folders: Path, root: Path | None = None) -> types.InitializeParams:
    return types.InitializeParams(
        capabilities=types.ClientCapabilities(),
        workspace_folders=[types.WorkspaceFolder(uri=f.as_uri(), name=f.name) for f in folders] or None,
        root_uri=root.as_uri() if root else None,
    )


def test_the_folders_come_from_workspace_folders_else_the_root_and_only_file_uris_count(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    assert Workspace.from_initialize(params(a, b)).folders == (a.resolve(), b.resolve())
    assert Workspace.from_initialize(params(root=b)).folders == (b.resolve(),)
    remote = types.InitializeParams(
        capabilities=types.ClientCapabilities(),
        workspace_folders=[types.WorkspaceFolder(uri="vscode-remote://host/w", name="w")],
    )
    assert Workspace.from_initialize(remote).folders == ()


def test_a_document_is_located_in_the_innermost_folder_and_outside_ones_are_not(tmp_path: Path) -> None:
    outer, inner = tmp_path / "w", tmp_path / "w" / "lib"
    inner.mkdir(parents=True)
    space = Workspace.from_initialize(params(outer, inner))
    assert space.locate((inner / "pkg" / "a.py").as_uri()) == (inner.resolve(), "pkg/a.py")
    assert space.locate((outer / "b.py").as_uri()) == (outer.resolve(), "b.py")
    assert space.locate((tmp_path / "elsewhere.py").as_uri()) is None
    assert space.locate("untitled:Untitled-1") is None


def test_the_listing_skips_hidden_folders_environments_and_build_output(tmp_path: Path) -> None:
    make_tree(
        tmp_path,
        {
            "app/main.py": "",
            "app/README.md": "",
            ".git/hooks/x.py": "",
            ".venv/lib/y.py": "",
            "venv/lib/z.py": "",
            "node_modules/pkg/n.py": "",
            "app/__pycache__/main.py": "",
            "build/lib/app/main.py": "",
        },
    )
    space = Workspace.from_initialize(params(tmp_path))
    assert space.python_files(tmp_path.resolve()) == {"app/main.py"}


def test_nothing_outside_the_listing_is_read_not_even_through_a_link(tmp_path: Path) -> None:
    folder, outside = tmp_path / "w", tmp_path / "secret.py"
    make_tree(folder, {"app/ok.py": "x = 1\n", "app/big.py": "#" * (ws.MAX_FILE_BYTES + 1)})
    outside.write_text("TOKEN = 'abc'\n", encoding="utf-8")
    os.symlink(outside, folder / "app" / "link.py")
    (folder / "app" / "latin.py").write_bytes(b"name = '\xe9'\n")
    space = Workspace.from_initialize(params(folder))
    root = folder.resolve()
    assert space.read(root, "app/ok.py") == "x = 1\n"
    assert "app/link.py" in space.python_files(root)  # listed (a file link), but it leaves the folder:
    assert space.read(root, "app/link.py") is None
    assert space.read(root, "../secret.py") is None  # not listed
    assert space.read(root, "app/big.py") is None  # over MAX_FILE_BYTES
    assert space.read(root, "app/latin.py") is None  # not UTF-8
    assert space.read(tmp_path, "secret.py") is None  # not a workspace folder


def test_a_changed_file_is_read_again(tmp_path: Path) -> None:
    make_tree(tmp_path, {"a.py": "x = 1\n"})
    space = Workspace.from_initialize(params(tmp_path))
    root = tmp_path.resolve()
    assert space.read(root, "a.py") == "x = 1\n"
    (tmp_path / "a.py").write_text("x = 22\n", encoding="utf-8")  # another size
    assert space.read(root, "a.py") == "x = 22\n"


def test_sources_are_the_other_open_documents_then_the_imported_files_open_text_first(tmp_path: Path) -> None:
    make_tree(
        tmp_path,
        {
            "billing/__init__.py": "",
            "billing/tax.py": "RATE = 0.2  # on disk\n",
            "billing/lines.py": "class Line: ...\n",
            "billing/invoice.py": "",
        },
    )
    space = Workspace.from_initialize(params(tmp_path))
    here = (tmp_path / "billing" / "invoice.py").as_uri()
    text = "from billing import tax\nfrom .lines import Line\n"
    open_docs = [
        (here, text),  # the document itself: not a source
        ((tmp_path / "billing" / "tax.py").as_uri(), "RATE = 0.25  # being edited\n"),
        ((tmp_path / "notes.py").as_uri(), "todo = []\n"),
        ("file:///elsewhere/other.py", "outside = True\n"),  # outside the workspace
    ]
    found = space.neighbours(here, text, "python", open_docs)
    assert found is not None and found.path == "billing/invoice.py"
    assert [(s.path, s.kind, s.text) for s in found.sources] == [
        ("billing/tax.py", "open", "RATE = 0.25  # being edited\n"),
        ("notes.py", "open", "todo = []\n"),
        ("billing/lines.py", "import", "class Line: ...\n"),
    ]
    assert space.neighbours(here, text, "python", [], imports=False) is None  # no source at all
    assert space.neighbours("file:///elsewhere/x.py", text, "python", open_docs) is None


def test_many_open_documents_leave_the_imported_files_their_own_places(tmp_path: Path) -> None:
    make_tree(tmp_path, {"app/util.py": "def helper(): ...\n", **{f"tabs/t{i}.py": "" for i in range(12)}})
    space = Workspace.from_initialize(params(tmp_path))
    open_docs = [((tmp_path / "tabs" / f"t{i}.py").as_uri(), f"t{i} = {i}\n") for i in range(12)]
    found = space.neighbours(
        (tmp_path / "app" / "main.py").as_uri(), "from app.util import helper\n", "python", open_docs
    )
    assert found is not None
    assert [s.kind for s in found.sources] == ["open"] * ws.MAX_SOURCES + ["import"]
    assert found.sources[-1].path == "app/util.py"
