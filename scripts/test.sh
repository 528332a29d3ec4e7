#!/usr/bin/env bash
# `make test`: install what is needed, lint, type-check, then run the suite twice —
# on Debian's own python3 and paho-mqtt 1.6.1 (everything, system tests included), and on
# a venv with the newest PyPI releases (paho-mqtt 2.x; all but the systemd-nspawn tests).
# Any failure, and "no tests ran" (pytest exit 5), fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GATEWAYD_VENV:-.venv-pypi}
scripts/install-deps.sh

echo "== lint"
"$VENV/bin/ruff" check gatewayd tests scripts
"$VENV/bin/mypy" gatewayd tests
shellcheck watchdog/gatewayd-watchdog scripts/*.sh

read -r -a PYTEST_ARGS <<< "${PYTEST_ARGS:-}"
echo "== tests: Debian python3 $(/usr/bin/python3 -c 'import sys; print(sys.version.split()[0])'), paho-mqtt 1.6.1"
/usr/bin/python3 -m pytest -p no:cacheprovider "${PYTEST_ARGS[@]}" tests
echo "== tests: PyPI venv, paho-mqtt $("$VENV/bin/python" -c 'import paho.mqtt; print(paho.mqtt.__version__)')"
"$VENV/bin/python" -m pytest -p no:cacheprovider -m "not system" "${PYTEST_ARGS[@]}" tests
