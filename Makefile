# One command each: `make demo` and `make test` set up .venv first (once per pyproject change).
# torch is installed on its own, pinned, before the project: on a CPU-only machine an
# unpinned torch pulls a multi-GB CUDA build. GPU hosts: `make setup TORCH=torch` (or keep
# the CUDA build already installed in VENV).
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell (cat pyproject.toml; echo '$(CURDIR)') | cksum | cut -d' ' -f1)

.PHONY: setup system-deps demo test test-busy lint unit bench clean

# Browser tests drive Debian's Chromium (never a downloaded browser); the SSH-tunnel test
# needs coturn; speech tests need espeak-ng (GPL: run as a separate program, never imported).
# Installed when missing (as root, or with passwordless sudo); otherwise those tests are
# skipped with a message saying what to install.
SYSTEM_PACKAGES := chromium chromium-driver coturn espeak-ng
system-deps:
	@if command -v chromium >/dev/null && command -v turnserver >/dev/null && \
	    command -v espeak-ng >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
	elif sudo -n true 2>/dev/null; then \
	  sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
	else echo "note: install $(SYSTEM_PACKAGES) (apt) to run the browser tests; skipping them"; fi

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet '$(TORCH)'
	$(PY) -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/voxtral-server demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy src

unit: $(STAMP) system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

test: lint unit

# `make test` while two CPU burners keep both cores of a 2-core machine busy (what a loaded
# CI runner sees): the suite must not depend on how fast anything runs. The burners are
# stopped however the run ends (trap), and the target exits with `make test`'s status.
test-busy:
	@python3 -c "while True: pass" & b1=$$!; \
	python3 -c "while True: pass" & b2=$$!; \
	trap 'kill $$b1 $$b2 2>/dev/null' EXIT INT TERM; \
	echo "test-busy: CPU burners $$b1 $$b2 running"; \
	$(MAKE) test; status=$$?; \
	exit $$status

bench: $(STAMP)
	$(PY) benchmarks/mel.py
	$(PY) benchmarks/engine.py
	$(PY) benchmarks/history.py
	$(PY) benchmarks/transport.py
	$(PY) benchmarks/ttft_suite.py --baseline seed
	$(PY) benchmarks/load.py
	$(PY) benchmarks/isolation.py
	$(PY) benchmarks/soak.py
	$(PY) benchmarks/smart_turn_eval.py
	$(PY) benchmarks/endpointing.py --transport websocket --transport webrtc --random-lead \
	  --wav static/sample.wav --mode '{"type":"server_vad","silence_duration_ms":500}' \
	  --mode '{"type":"semantic_vad","eagerness":"auto"}'
	$(PY) benchmarks/jitter.py
	$(PY) benchmarks/browser.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
