"""Where the shared server's socket lives (server.shared): one per settings file and data dir, in a folder
only this user may enter, and the errors that name what is wrong with it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from server import __version__
from server.shared import SharedServerError, connect_tcp, runtime_dir, socket_path


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    base = tmp_path / "run"
    base.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
    return base


def test_the_socket_is_named_by_the_settings_file_and_the_data_dir(runtime: Path, tmp_path: Path) -> None:
    config, data = tmp_path / "heedful.toml", tmp_path / "data"
    digest = hashlib.sha256(f"{config}\0{data}\0{__version__}".encode()).hexdigest()[:16]
    assert socket_path(config, data) == runtime / "heedful" / f"serve-{digest}.sock"
    assert socket_path(tmp_path / "." / "heedful.toml", data) == socket_path(config, data)  # resolved first
    assert socket_path(tmp_path / "other.toml", data) != socket_path(config, data)
    assert socket_path(config, tmp_path / "data2") != socket_path(config, data)
    assert socket_path(config, data, "9.9.9") != socket_path(config, data)  # an upgrade gets a server of its own
    no_file = hashlib.sha256(f"\0{data}\0{__version__}".encode()).hexdigest()[:16]
    assert socket_path(None, data).name == f"serve-{no_file}.sock"
    assert (runtime / "heedful").stat().st_mode & 0o777 == 0o700


def test_without_a_runtime_dir_the_folder_is_per_user_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    assert runtime_dir() == tmp_path / f"heedful-{os.getuid()}"


def test_a_folder_others_may_enter_is_refused_with_the_fix(runtime: Path) -> None:
    (runtime / "heedful").mkdir(mode=0o755)
    (runtime / "heedful").chmod(0o755)
    with pytest.raises(SharedServerError) as err:
        runtime_dir()
    message = str(err.value)
    assert str(runtime / "heedful") in message and "drwxr-xr-x" in message and "remove it" in message


def test_a_socket_path_too_long_for_unix_sockets_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(deep))
    with pytest.raises(SharedServerError, match="longer than the 107 bytes.*set XDG_RUNTIME_DIR to a shorter folder"):
        socket_path(None, tmp_path)


@pytest.mark.parametrize("address", ["nowhere", ":2087", "host:", "host:port", "host:70000", "host:0"])
async def test_a_connect_address_that_is_not_host_port_is_named(address: str) -> None:
    with pytest.raises(SharedServerError, match=f"--connect {address}: give the server's address as HOST:PORT"):
        await connect_tcp(address)
