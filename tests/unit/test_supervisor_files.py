"""Remote files: path confinement, atomic writes, the FILES / FILE_CONTENT / FILE_HASHES flow."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from gatewayd.supervisor import fileio
from gatewayd.supervisor import files as F
from gatewayd.supervisor.fileio import FileRefused, atomic_write, lexical_path, read_file
from gatewayd.supervisor.files import FileManager
from gatewayd.supervisor.jobs import Serial
from tests.helpers.daemons import wait_for


def confine(raw: str, roots: list[Path], variables: dict[str, str] | None = None) -> Path:
    """The path as the worker reaches it: lexical checks, then a read through the checked directory."""
    path = lexical_path(raw, roots, variables)
    snap = read_file(path, roots, 1 << 20, 0)
    if snap.error is not None:
        raise FileRefused(snap.error)
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


def test_confine_accepts_paths_inside(root: Path) -> None:
    assert confine(str(root / "a.txt"), [root]) == root / "a.txt"
    assert confine("sub/b.txt", [root]) == root / "sub" / "b.txt"  # relative: under the first root
    names = {"DATA": str(root)}
    assert confine("${DATA}/c.txt", [root], names) == root / "c.txt"
    assert confine("$DATA/c.txt", [root], names) == root / "c.txt"
    (root / "inner").mkdir()
    (root / "inner" / "d").write_text("x")
    os.symlink(root / "inner", root / "link")
    assert confine(str(root / "link" / "d"), [root]) == root / "link" / "d"  # a directory link inside: fine
    assert read_file(root / "link" / "d", [root], 100, 100).data == b"x"


@pytest.mark.parametrize("bad, why", [
    ("{root}/../escape.txt", "'..'"),
    ("../escape.txt", "'..'"),
    ("/etc/passwd", "outside the allowed roots"),
    ("{root}", "allowed root itself"),
    ("$GWTEST_UNSET_VAR/x", "path_variables"),
    ("~/x", "'~' is not expanded"),
    ("a\udcffb", "not valid Unicode"),
    ("a\x00b", "NUL"),
])
def test_confine_refuses(root: Path, bad: str, why: str) -> None:
    with pytest.raises(FileRefused, match=why):
        confine(bad.format(root=root), [root])


def test_confine_refuses_symlink_escapes(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "out")
    os.symlink(tmp_path / "secret", root / "file-link")
    (tmp_path / "secret").write_text("secret")
    with pytest.raises(FileRefused, match="symbolic link"):
        confine(str(root / "out" / "x"), [root])
    with pytest.raises(FileRefused, match="symbolic link"):
        confine(str(root / "file-link"), [root])


def test_atomic_write_replaces_keeps_mode_and_leaves_no_temp(root: Path) -> None:
    target = root / "cfg.txt"
    target.write_text("old")
    os.chmod(target, 0o640)
    atomic_write(target, b"new content", [root])
    assert target.read_bytes() == b"new content"
    assert (target.stat().st_mode & 0o777) == 0o640
    assert sorted(p.name for p in root.iterdir()) == ["cfg.txt"]


def test_atomic_write_failure_keeps_the_old_file(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = root / "cfg.txt"
    target.write_text("old")

    def boom(*a: Any, **k: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio.os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write(target, b"new", [root])
    assert target.read_text() == "old"
    assert sorted(p.name for p in root.iterdir()) == ["cfg.txt"]


def test_atomic_write_refuses_a_directory_swapped_for_an_outside_link(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "d")
    with pytest.raises(FileRefused, match="outside the allowed roots"):
        atomic_write(root / "d" / "x", b"data", [root])
    assert not (outside / "x").exists()


def test_encodings() -> None:
    assert F.encode_content("héllo", "text") == "héllo".encode()
    assert F.encode_content(base64.b64encode(b"\x00\x01").decode(), "base64") == b"\x00\x01"
    assert json.loads(F.encode_content({"a": 1}, "json")) == {"a": 1}
    assert F.encode_content('{"a": 1}', "json") == b'{"a": 1}'
    for value, enc in ((1, "text"), ("@@@", "base64"), ("{nope", "json")):
        with pytest.raises(FileRefused):
            F.encode_content(value, enc)
    assert F.decode_content(b'{"a":1}', "json") == {"a": 1}
    assert F.decode_content(b"\x00", "base64") == "AA=="


def test_parse_files() -> None:
    defs, errors, general = F.parse_files(json.dumps({"a": {"path": "x"}, "b": {"nopath": 1},
                                                      "c": {"path": "y", "encoding": "xml"}}))
    assert list(defs) == ["a"] and set(errors) == {"b", "c"} and general == []
    with pytest.raises(FileRefused):
        F.parse_files("[1, 2]")


class Recorder:
    def __init__(self) -> None:
        self.published: list[dict[str, Any]] = []
        self.requested: list[list[str]] = []
        self.restarts: list[str] = []
        self.saved: dict[str, Any] = {}

    def manager(self, roots: list[Path], **kw: Any) -> FileManager:
        return FileManager(roots, 60000, self.published.append, self.requested.append, self.restarts.append,
                           self.saved.update, **kw)

    def last(self, key: str) -> Any:
        for p in reversed(self.published):
            if key in p:
                return p[key]
        raise KeyError(key)


def test_write_version_flow(root: Path) -> None:
    rec = Recorder()
    fm = rec.manager([root])
    target = root / "app.conf"
    target.write_text("v0")
    fm.on_files({"app": {"path": str(target), "write_version": 1, "restart_controller_on_change": True}})
    assert rec.requested == [["FILE_CONTENT_app"]]
    assert rec.last("FILE_READ_app") == "v0"
    assert rec.last("FILE_HASHES") == {"app": {"hash": hashlib.md5(b"v0").hexdigest(), "write_version": None}}
    # the response arrives: written, reported, the controller restarted
    fm.on_content("app", "v1", pushed=False)
    assert target.read_text() == "v1"
    assert rec.last("FILE_HASHES") == {"app": {"hash": hashlib.md5(b"v1").hexdigest(), "write_version": 1}}
    assert rec.last("FILE_READ_app") == "v1"
    assert rec.restarts == ["remote file app changed"]
    # the same definitions again (attribute refresh after a reconnect): nothing requested, nothing written
    rec.requested.clear()
    fm.on_files({"app": {"path": str(target), "write_version": 1, "restart_controller_on_change": True}})
    assert rec.requested == []
    fm.on_content("app", "v1", pushed=False)
    assert rec.restarts == ["remote file app changed"]
    # a new write_version asks again
    fm.on_files({"app": {"path": str(target), "write_version": 2}})
    assert rec.requested == [["FILE_CONTENT_app"]]
    # a pushed content is written at once
    fm.on_content("app", "pushed", pushed=True)
    assert target.read_text() == "pushed"
    assert rec.saved["applied"] == {"app": 2}


def test_refusals_are_reported_and_write_nothing(root: Path, tmp_path: Path) -> None:
    rec = Recorder()
    fm = rec.manager([root])
    os.symlink(tmp_path, root / "up")
    fm.on_files({"dots": {"path": f"{root}/../x"}, "abs": {"path": "/etc/gatewayd-test-x"},
                 "link": {"path": f"{root}/up/y"}, "missing": {"path": str(root / "m.txt")}})
    for key, text in (("dots", "'..'"), ("abs", "outside"), ("link", "symbolic link")):
        assert text in rec.last(f"FILE_ERROR_{key}")
        fm.on_content(key, "data", pushed=True)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert not Path("/etc/gatewayd-test-x").exists()
    # a missing file is created only with create_if_not_exist
    fm.on_content("missing", "data", pushed=True)
    assert "create_if_not_exist" in rec.last("FILE_ERROR_missing")
    assert not (root / "m.txt").exists()
    fm.on_files({"missing": {"path": str(root / "new" / "m.txt"), "create_if_not_exist": True}})
    fm.on_content("missing", "data", pushed=True)
    assert (root / "new" / "m.txt").read_text() == "data"
    assert rec.last("FILE_ERROR_missing") == ""


def test_change_detection_on_the_expanded_path(root: Path) -> None:
    rec = Recorder()
    fm = rec.manager([root], variables={"DATA": str(root)})
    target = root / "watched.json"
    target.write_text('{"a": 1}')
    fm.on_files({"w": {"path": "${DATA}/watched.json", "encoding": "json"}})
    n = len(rec.published)
    fm.check_changes()
    assert len(rec.published) == n
    target.write_text('{"a": 2}')
    os.utime(target, ns=(1, 1))
    fm.check_changes()
    assert rec.last("FILE_READ_w") == {"a": 2}
    assert rec.last("FILE_HASHES")["w"]["hash"] == hashlib.md5(b'{"a": 2}').hexdigest()


def test_state_survives_a_restart(root: Path) -> None:
    rec = Recorder()
    fm = rec.manager([root])
    (root / "a").write_text("x")
    fm.on_files({"a": {"path": str(root / "a"), "write_version": 3}})
    fm.on_content("a", "y", pushed=False)
    rec2 = Recorder()
    fm2 = rec2.manager([root])
    fm2.load(rec.saved)
    assert fm2.applied == {"a": 3} and "a" in fm2.defs
    assert rec2.requested == []


def test_init_files_reports_everything(root: Path) -> None:
    rec = Recorder()
    fm = rec.manager([root])
    (root / "a").write_text("x")
    fm.on_files({"a": {"path": str(root / "a")}})
    rec.published.clear()
    fut = fm.init_files()
    assert fut.done() and fut.error is None
    out = fut.result
    assert out["files"]["a"]["hash"] == hashlib.md5(b"x").hexdigest()
    assert rec.last("FILE_READ_a") == "x"
    assert ["FILES"] in rec.requested


def test_too_large_to_report(root: Path) -> None:
    rec = Recorder()
    fm = FileManager([root], 100, rec.published.append, rec.requested.append, rec.restarts.append, rec.saved.update)
    (root / "big").write_text("x" * 1000)
    fm.on_files({"big": {"path": str(root / "big")}})
    assert "too large" in rec.last("FILE_ERROR_big")
    assert rec.last("FILE_HASHES")["big"]["hash"] == hashlib.md5(b"x" * 1000).hexdigest()


def test_a_fifo_is_refused_without_blocking(root: Path) -> None:
    os.mkfifo(root / "pipe")
    rec = Recorder()
    fm = rec.manager([root])
    t = threading.Thread(target=fm.on_files, args=({"p": {"path": "pipe"}},), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "opening the FIFO blocked"
    assert "a FIFO, not a regular file" in rec.last("FILE_ERROR_p")
    assert rec.last("FILE_HASHES") == {"p": {"hash": None, "write_version": None}}
    fm.on_content("p", "data", pushed=True)  # nor is it written to
    assert "FIFO" in rec.last("FILE_ERROR_p") and stat.S_ISFIFO(os.lstat(root / "pipe").st_mode)


def test_a_symlink_swapped_in_after_the_check_is_not_followed(root: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "credentials.json"
    secret.write_text('{"token": "s3cr3t"}')
    target = root / "app.json"
    target.write_text("{}")
    real_open_dir = fileio.open_dir

    def open_dir_then_swap(parent: Path, roots: list[Path], create: bool = False) -> int:
        dfd = real_open_dir(parent, roots, create)
        if target.is_file() and not target.is_symlink():
            target.unlink()
            os.symlink(secret, target)  # the container wins the race: after the check, before the open
        return dfd

    monkeypatch.setattr(fileio, "open_dir", open_dir_then_swap)
    rec = Recorder()
    fm = rec.manager([root])
    fm.on_files({"app": {"path": "app.json", "encoding": "json"}})
    assert "symbolic link" in rec.last("FILE_ERROR_app")
    assert not any("s3cr3t" in json.dumps(p) for p in rec.published)
    fm.on_content("app", {"x": 1}, pushed=True)  # a write never goes through the link either
    assert secret.read_text() == '{"token": "s3cr3t"}' and "symbolic link" in rec.last("FILE_ERROR_app")


def test_a_directory_swapped_for_a_link_after_the_check_leads_nowhere(root: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_text("outside")
    (root / "sub").mkdir()
    (root / "sub" / "f").write_text("inside")
    real_realpath = os.path.realpath

    def realpath_then_swap(p: Any, *a: Any, **k: Any) -> str:
        out = real_realpath(p, *a, **k)
        if str(p) == str(root / "sub") and not (root / "sub").is_symlink():
            os.rename(root / "sub", tmp_path / "moved")
            os.symlink(outside, root / "sub")
        return out

    monkeypatch.setattr(fileio.os.path, "realpath", realpath_then_swap)
    snap = read_file(root / "sub" / "f", [root], 1 << 20, 1 << 20)
    assert snap.data is None and snap.error is not None and "link" in snap.error
    w = fileio.write_file(root / "sub" / "f", b"new", [root], 1 << 20, create=True)
    assert w.error is not None and (outside / "f").read_text() == "outside"


def test_files_over_the_size_limit_are_refused_unread(root: Path) -> None:
    with open(root / "huge", "wb") as f:
        f.truncate(1 << 40)  # sparse: a terabyte nobody could read in a test
    rec = Recorder()
    fm = rec.manager([root], max_file_bytes=1 << 20)
    fm.on_files({"huge": {"path": "huge"}})
    assert "larger than [files] max_file_bytes (1048576)" in rec.last("FILE_ERROR_huge")
    assert rec.last("FILE_HASHES")["huge"]["hash"] is None


def test_disk_work_in_the_worker_never_holds_the_caller() -> None:
    worker = Serial("test-files")
    gate = threading.Event()
    results: list[int] = []
    try:
        worker.submit(lambda: gate.wait(10) and 1, done=results.append)
        worker.submit(lambda: 2, done=results.append)
        assert not worker.idle() and worker.drain() == 0 and results == []  # returned at once
        gate.set()
        wait_for(lambda: (worker.drain(), results == [1, 2])[1], 10, what="the results")
        assert worker.idle()
    finally:
        worker.stop()
