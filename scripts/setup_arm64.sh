#!/usr/bin/env bash
# `make arm64`: an aarch64 onnxruntime that runs under user-mode emulation, for `sqexport check --arch arm64`.
# Writes only under $SQEXPORT_ARM64_ROOT (default ~/.cache/sqexport/arm64), except for installing
# Debian's qemu-user-static on the host. The arm64 packages come from a private apt configuration
# (own sources, state and cache under the root), so the host's apt and dpkg state stay untouched.
set -euo pipefail
ROOT="${SQEXPORT_ARM64_ROOT:-$HOME/.cache/sqexport/arm64}"
PYTHON="${PYTHON:-python3}"
SUITE="${ARM64_SUITE:-bookworm}"
MIRROR="${ARM64_MIRROR:-http://deb.debian.org/debian}"
# the same versions as the host venv, so both sides run the same onnxruntime
WHEELS="onnxruntime==1.32.0 numpy==2.4.6 protobuf==7.36.2 flatbuffers==25.12.19 packaging==26.3"
PACKAGES="python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 libgcc-s1 libstdc++6
          zlib1g libexpat1 libffi8 libbz2-1.0 liblzma5 libssl3 libuuid1"

if ! command -v qemu-aarch64-static >/dev/null; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static >/dev/null
fi

mkdir -p "$ROOT"/apt/{etc/preferences.d,state/lists/partial,cache/archives/partial,debs} "$ROOT/sysroot"
echo "deb [arch=arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR $SUITE main" \
    > "$ROOT/apt/etc/sources.list"
: > "$ROOT/apt/state/status"
APT=(-o "Dir::Etc=$ROOT/apt/etc" -o "Dir::Etc::sourcelist=$ROOT/apt/etc/sources.list"
     -o "Dir::Etc::sourceparts=-" -o "Dir::State=$ROOT/apt/state" -o "Dir::State::status=$ROOT/apt/state/status"
     -o "Dir::Cache=$ROOT/apt/cache" -o "APT::Architecture=arm64" -o "APT::Architectures=arm64"
     -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root")
apt-get "${APT[@]}" update -qq
(cd "$ROOT/apt/debs" && apt-get "${APT[@]}" download $PACKAGES >/dev/null)
for deb in "$ROOT"/apt/debs/*.deb; do dpkg -x "$deb" "$ROOT/sysroot"; done

# onnxruntime's CPU detection crashes under emulation when it reads the host's CPU lists;
# qemu -L looks paths up in the sysroot first, so empty files there hide them.
mkdir -p "$ROOT/sysroot/sys/devices/system/cpu"
: > "$ROOT/sysroot/sys/devices/system/cpu/possible"
: > "$ROOT/sysroot/sys/devices/system/cpu/present"

# exact pins, no resolver: the host's own installed packages are none of its business here
"$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --upgrade --target "$ROOT/site" \
    --platform manylinux_2_28_aarch64 --python-version 3.11 --implementation cp --only-binary=:all: $WHEELS
# Debian byte-compiles at install time, dpkg -x does not: compile once here (same 3.11 bytecode),
# or every emulated start compiles the standard library again
if "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    "$PYTHON" -m compileall -q -j 0 "$ROOT/sysroot/usr/lib/python3.11" "$ROOT/site" >/dev/null || true
else
    PYTHONHOME="$ROOT/sysroot/usr" qemu-aarch64-static -L "$ROOT/sysroot" "$ROOT/sysroot/usr/bin/python3.11" \
        -m compileall -q "$ROOT/sysroot/usr/lib/python3.11" "$ROOT/site" >/dev/null 2>&1 || true
fi

cat > "$ROOT/ready.json" <<JSON
{"qemu": "$(command -v qemu-aarch64-static)", "python": "usr/bin/python3.11", "wheels": "$WHEELS"}
JSON
echo "arm64 emulator ready in $ROOT"
