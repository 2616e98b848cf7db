# The two set-up commands: `make demo` and `make test`. Both only install what is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-run

.PHONY: setup demo test test-extended lint clean

setup: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Re-install only when the dependency list changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: setup
	$(BIN)/simgap demo $(DEMO_DIR)

test: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest tests

# The full fault, kill and load suite (minutes to hours); `make test` runs its default subset.
test-extended: setup
	$(BIN)/python -m pytest tests -m extended

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) $(DEMO_DIR)
