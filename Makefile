# routerd: the three fixed entry points.
#   make install  - set up .venv, routerd, the engines (cached by version) and the default model
#   make serve    - install, then serve config/routerd.example.yaml on 127.0.0.1:11434
#   make test     - install, then the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CACHE ?= $(HOME)/.cache/routerd
MODEL := $(CACHE)/models/SmolLM2-135M-Instruct.Q4_1.gguf
STAMP := $(VENV)/.routerd-installed

.PHONY: install serve test bench clean system-deps

install: $(STAMP)
	@bash scripts/setup-engines.sh $(VENV)
	@test -x $(VENV)/bin/routerd && test -x $(VENV)/bin/llama-server

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip setuptools wheel
	@$(PY) -m pip install -q -e '.[test]'
	@touch $@

serve: install
	$(VENV)/bin/routerd serve --config config/routerd.example.yaml

# systemd-analyze (Debian package "systemd") verifies the unit file in the tests.
system-deps:
	@command -v systemd-analyze >/dev/null 2>&1 || { \
	  echo "[setup] installing Debian package systemd (for systemd-analyze verify)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq systemd >/dev/null; }
# Debian's chromium drives the dashboard tests (Playwright's Python package with
# executable_path=/usr/bin/chromium; Playwright's own browser download is never used).
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
	  echo "[setup] installing Debian packages chromium, chromium-driver (dashboard tests)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; }
# iproute2's `ip netns` gives the several-host tests (tests/netns.py) their hosts.
	@command -v ip >/dev/null 2>&1 || { \
	  echo "[setup] installing Debian package iproute2 (ip netns, several-host tests)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq iproute2 >/dev/null; }

test: install system-deps
	$(VENV)/bin/pytest -q

# The bench extra (matplotlib for the chart, py-spy for the profile) is installed here only.
bench: install
	@$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info
