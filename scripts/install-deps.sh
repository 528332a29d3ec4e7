#!/usr/bin/env bash
# Install what building, testing and demonstrating gatewayd needs on a fresh Debian bookworm
# machine: Debian packages (the runtime the .deb depends on, plus test peers) and a venv with
# the newest PyPI releases (paho-mqtt 2.x) for the second test run and the linters.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3 python3-venv python3-pip python3-pytest python3-hypothesis
  python3-prometheus-client python3-cryptography openssl
  python3-paho-mqtt python3-sdnotify python3-psutil python3-docker python3-pyudev
  mosquitto sqlite3 procps iproute2 psmisc
  docker.io busybox-static git
  systemd-container debootstrap
  debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools lintian shellcheck
  build-essential fakeroot
)
VENV=${GATEWAYD_VENV:-.venv-pypi}
PYPI_PACKAGES=(paho-mqtt sdnotify psutil docker pyudev pytest hypothesis prometheus_client cryptography ruff mypy)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# The mosquitto package starts a system broker where systemd runs; tests use their own ports.
if [ ! -x "$VENV/bin/python" ]; then
  /usr/bin/python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import paho.mqtt, ruff, mypy, pytest, docker, psutil, pyudev, sdnotify, hypothesis, prometheus_client, cryptography" 2>/dev/null \
   && ! { "$VENV/bin/python" -c "import paho.mqtt, mypy, pytest, docker, psutil, pyudev, sdnotify, hypothesis, prometheus_client, cryptography" 2>/dev/null \
          && [ -x "$VENV/bin/ruff" ]; }; then
  "$VENV/bin/pip" install -q --upgrade "${PYPI_PACKAGES[@]}"
fi
echo "install-deps: ok (paho-mqtt $(/usr/bin/python3 -c 'import paho.mqtt; print(paho.mqtt.__version__)') in Debian," \
     "$("$VENV/bin/python" -c 'import paho.mqtt; print(paho.mqtt.__version__)') in $VENV)"
