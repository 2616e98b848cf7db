# The two commands: `make demo` and `make test`. Both only install what is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-run
DEMO_FLAGS ?=

.PHONY: setup demo test test-extended lint clean chromium

# Everything `make demo` and `make test` need: the venv with simgap and its test extra, and
# Debian's chromium for the report's browser test.
setup: $(STAMP) chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Re-install only when the dependency list changes. The torch pins live in pyproject.toml only.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# tests/test_browser.py drives a real headless Chromium (Debian's package). Installed with
# apt-get when missing (sudo when not root); when that is not possible, setup warns and goes on
# (the demo does not need it; the browser test then fails and says why).
chromium:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	  echo "make setup: warning: chromium is missing and there is no apt-get; tests/test_browser.py needs it" >&2; \
	else \
	  SUDO=""; if [ "$$(id -u)" != 0 ]; then SUDO="sudo"; fi; \
	  echo "make setup: installing Debian's chromium (for tests/test_browser.py)"; \
	  { $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || \
	  echo "make setup: warning: could not install chromium; tests/test_browser.py needs it" >&2; \
	fi

demo: setup
	$(BIN)/simgap demo $(DEMO_DIR) $(DEMO_FLAGS)

test: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest tests --durations=15

# The full fault, kill and load suite (minutes to hours); `make test` runs its default subset.
# fault-summary.json: the fault section's numbers (kills survived, inputs tried, load, tracebacks).
test-extended: setup
	SIMGAP_FAULT_SUMMARY=fault-summary.json $(BIN)/python -m pytest tests -m extended --durations=15

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) $(DEMO_DIR)
