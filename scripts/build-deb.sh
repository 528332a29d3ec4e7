#!/bin/bash
# Build the Debian package gatewayd_<version>_all.deb into dist/ (`make deb`).
#
#   scripts/build-deb.sh [--no-lintian] [--out DIR]
#
# Works from a clean checkout as root: installs missing build dependencies with apt-get,
# builds in a scratch copy of the tree (so debian/ build leftovers never land in the
# work tree and dpkg-buildpackage's output is not written beside the repository), then
# runs lintian and fails on any error or warning.
set -euo pipefail

cd "$(dirname "$0")/.."
repo=$(pwd)
# Debian's tools and Debian's python3 only: a pyenv/venv python earlier on PATH would be
# picked up by pybuild and miss the Debian build modules.
export PATH=/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV
out=$repo/dist
run_lintian=1
while [[ $# -gt 0 ]]; do
    case $1 in
        --no-lintian) run_lintian=0 ;;
        --out) out=$2; shift ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "build-deb: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

log() { printf 'build-deb: %s\n' "$*" >&2; }

# The package version comes from debian/changelog; it must match pyproject.toml.
deb_version=$(dpkg-parsechangelog -l debian/changelog -S Version)
py_version=$(/usr/bin/python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml","rb"))["project"]["version"])')
if [[ $deb_version != "$py_version" ]]; then
    log "version mismatch: debian/changelog has $deb_version, pyproject.toml has $py_version"
    log "add a changelog entry: dch -v $py_version 'New upstream version' (package devscripts)"
    exit 1
fi

need_apt_update=1
apt_install() {
    if [[ $need_apt_update -eq 1 ]]; then
        apt-get update -qq >&2 || log "apt-get update failed; trying with the lists we have"
        need_apt_update=0
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >&2
}

for tool in dpkg-buildpackage:dpkg-dev dh:debhelper; do
    if ! command -v "${tool%%:*}" >/dev/null 2>&1; then
        apt_install "${tool#*:}"
    fi
done
if [[ $run_lintian -eq 1 ]] && ! command -v lintian >/dev/null 2>&1; then
    apt_install lintian
fi
if ! dpkg-checkbuilddeps debian/control 2>/dev/null; then
    log "installing build dependencies"
    if [[ $need_apt_update -eq 1 ]]; then
        apt-get update -qq >&2 || true
        need_apt_update=0
    fi
    DEBIAN_FRONTEND=noninteractive apt-get build-dep -y --no-install-recommends "$repo" >&2
fi

scratch=$(mktemp -d /tmp/gatewayd-deb.XXXXXX)
cleanup() { rm -rf "$scratch"; }
trap cleanup EXIT
src=$scratch/gatewayd-$deb_version
mkdir -p "$src"
# Copy the tree without VCS data, virtualenvs, caches and earlier build output.
tar -C "$repo" \
    --exclude=./.git --exclude='./.venv*' --exclude=./dist --exclude=./build \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude='*.pyc' \
    --exclude=.pytest_cache --exclude=.mypy_cache --exclude=.ruff_cache --exclude=./.cache \
    --exclude=./debian/gatewayd --exclude=./debian/.debhelper --exclude=./debian/files \
    --exclude='./debian/*.substvars' --exclude='./debian/*.log' \
    --exclude=./debian/debhelper-build-stamp \
    -cf - . | tar -C "$src" -xf -

log "dpkg-buildpackage in $src"
(cd "$src" && dpkg-buildpackage -us -uc -b) >"$scratch/build.log" 2>&1 || {
    tail -n 60 "$scratch/build.log" >&2
    log "dpkg-buildpackage failed (full log above, last 60 lines)"
    exit 1
}

deb=$scratch/gatewayd_${deb_version}_all.deb
if [[ ! -f $deb ]]; then
    log "expected $deb, not built"
    ls -l "$scratch" >&2
    exit 1
fi
mkdir -p "$out"
rm -f "$out"/gatewayd_*_all.deb
cp "$deb" "$out/"
cp "$scratch"/gatewayd_"${deb_version}"_*.changes "$out/" 2>/dev/null || true
cp "$scratch"/gatewayd_"${deb_version}"_*.buildinfo "$out/" 2>/dev/null || true

if [[ $run_lintian -eq 1 ]]; then
    log "lintian"
    # Errors and warnings fail the build; info/pedantic tags are shown but allowed.
    # (TMPDIR: lintian leaves its cache files behind in it.)
    TMPDIR=$scratch lintian --fail-on error,warning --info "$out/gatewayd_${deb_version}_all.deb" >&2
fi

log "built $out/gatewayd_${deb_version}_all.deb"
echo "$out/gatewayd_${deb_version}_all.deb"
