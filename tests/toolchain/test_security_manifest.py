"""Item 1 of issue 20: `.sqexport-manifest.json` is data from disk. Replacing an earlier output
deletes only plain files inside the folder whose size and sha256 match the manifest; a manifest
naming anything else (`../x`, absolute paths, symlinks, subfolder escapes) removes nothing."""
import hashlib
import json
import os

import pytest

from sqexport.contracts.errors import OutputError
from sqexport.toolchain.manifest import MANIFEST, owned, read_manifest, record, safe_relative
from sqexport.toolchain.output_folder import atomic_output


def _entry(path, data: bytes) -> dict:
    return {"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _earlier_output(out, entries):
    out.mkdir(parents=True)
    (out / "report.json").write_text("{}")
    files = [_entry("report.json", b"{}")] + entries
    (out / MANIFEST).write_text(json.dumps({"tool": "sqexport", "version": 1, "files": files}))


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim.txt"
    path.write_bytes(b"precious")
    return path


@pytest.mark.parametrize("listed", ["../victim.txt", "{victim}", "sub/../../victim.txt", "./../victim.txt",
                                    "sub//x", "", "link", "linkdir/victim.txt", ".sqexport-manifest.json"])
def test_a_manifest_pointing_outside_removes_nothing(tmp_path, victim, listed):
    out = tmp_path / "out"
    _earlier_output(out, [_entry(listed.format(victim=victim), b"precious")])
    (out / "link").symlink_to(victim)
    (out / "linkdir").symlink_to(tmp_path)
    with pytest.raises(OutputError, match="choose another -o"):
        with atomic_output(out) as tmp:
            (tmp / "report.json").write_text("new")
    assert victim.read_bytes() == b"precious"
    assert (out / "report.json").read_text() == "{}" and os.path.islink(out / "link")
    assert sorted(os.listdir(tmp_path)) == ["out", "victim.txt"]


@pytest.mark.parametrize("manifest", ["[]", '{"files": {}}', '{"files": [{"path": "report.json", "size": 2}]}',
                                      '{"files": [{"path": "report.json", "size": "2", "sha256": "x"}]}', "\xff"])
def test_a_malformed_manifest_is_an_output_error(tmp_path, manifest):
    out = tmp_path / "out"
    _earlier_output(out, [])
    (out / MANIFEST).write_text(manifest)
    with pytest.raises(OutputError, match="cannot tell which files it wrote"):
        read_manifest(out)


def test_owned_needs_size_sha_and_a_plain_path(tmp_path, victim):
    out = tmp_path / "out"
    _earlier_output(out, [])
    assert owned(out, "report.json")
    (out / "report.json").write_text("{} ")
    assert not owned(out, "report.json")
    for rel in ("../victim.txt", str(victim), "a/../b", "."):
        assert not safe_relative(rel) and not owned(out, rel)


def test_record_adds_files_and_a_symlink_cannot_be_recorded(tmp_path, victim):
    out = tmp_path / "out"
    _earlier_output(out, [])
    (out / "new.zip").write_bytes(b"zip")
    record(out, ["new.zip"])
    assert owned(out, "new.zip") and owned(out, "report.json")
    (out / "link").symlink_to(victim)
    with pytest.raises(OutputError, match="link: not a regular file sqexport can record"):
        record(out, ["link"])


def test_parent_folders_made_for_the_output_go_when_the_run_fails(tmp_path):
    out = tmp_path / "made" / "for" / "run" / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output(out):
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    (tmp_path / "mine").mkdir()
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output(tmp_path / "mine" / "new" / "out"):
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == ["mine"] and os.listdir(tmp_path / "mine") == []
