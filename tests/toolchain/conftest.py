"""Fixtures for the toolchain tests: stand-in ssh, scp and adb executables for `sqexport bench`."""
import os

import pytest

FAKE_SSH = """#!/bin/sh
# stand-in ssh: drop options, "connect" to the host, run the remote command here
while [ $# -gt 0 ]; do case "$1" in -o|-p) shift 2;; -*) shift;; *) break;; esac; done
host="$1"; shift
case "$host" in *unreachable*) echo "ssh: connect to host $host port 22: Connection refused" >&2; exit 255;; esac
exec sh -c "$*"
"""
FAKE_SCP = """#!/bin/sh
while [ $# -gt 0 ]; do case "$1" in -o|-P) shift 2;; -*) shift;; *) break;; esac; done
n=$#; i=1; files=""
for a in "$@"; do if [ $i -lt $n ]; then files="$files $a"; else dest="${a#*:}"; fi; i=$((i+1)); done
exec cp $files "$dest"
"""
# stand-in adb: /data/local/tmp lives under $FAKE_DEVICE_ROOT
FAKE_ADB = """#!/bin/sh
if [ "$1" = "-s" ]; then serial="$2"; shift 2; fi
[ "$serial" = "offline" ] && { echo "adb: device 'offline' not found" >&2; exit 1; }
cmd="$1"; shift
args=$(printf '%s ' "$@" | sed "s#/data/local/tmp#$FAKE_DEVICE_ROOT#g")
case "$cmd" in
  shell) exec sh -c "$args";;
  push) set -- $args; n=$#; i=1; files="";
        for a in "$@"; do if [ $i -lt $n ]; then files="$files $a"; else dest="$a"; fi; i=$((i+1)); done
        exec cp $files "$dest";;
esac
exit 1
"""


@pytest.fixture
def fake_tools(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("ssh", FAKE_SSH), ("scp", FAKE_SCP), ("adb", FAKE_ADB)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "device").mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DEVICE_ROOT", str(tmp_path / "device"))
    return tmp_path
