# The two commands a newcomer needs: `make demo` (the product end to end on loopback) and
# `make test` (the whole suite). Both install what they need themselves.
PYTHON ?= /usr/bin/python3

.PHONY: all test demo bench deb lint unit clean

all: test

test:
	scripts/test.sh

demo:
	scripts/install-deps.sh
	$(PYTHON) scripts/demo.py

bench:
	scripts/install-deps.sh
	$(PYTHON) scripts/bench_forwarder.py
	$(PYTHON) scripts/bench_bridge.py
	$(PYTHON) scripts/bench_supervisor.py
	$(PYTHON) scripts/bench_ingest.py
	$(PYTHON) scripts/bench_http.py
	$(PYTHON) scripts/bench_cost.py
	$(PYTHON) scripts/fleet_sim.py

deb:
	scripts/build-deb.sh

lint:
	.venv-pypi/bin/ruff check gatewayd tests scripts
	.venv-pypi/bin/mypy gatewayd tests
	shellcheck watchdog/gatewayd-watchdog scripts/*.sh

unit:
	$(PYTHON) -m pytest -q tests/unit

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
