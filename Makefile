# The two commands: `make run` and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= config/demo.yaml

.PHONY: run test lint bench bench-peers schema clean

$(BIN)/edgehook: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $@

run: $(BIN)/edgehook
	$(BIN)/edgehook run -c $(CONFIG) --simulate

test: $(BIN)/edgehook
	@bash tests/ensure-mosquitto.sh
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(BIN)/edgehook
	$(BIN)/ruff check .

bench: $(BIN)/edgehook
	$(BIN)/python bench/run.py

bench-peers: $(BIN)/edgehook
	bash bench/peers.sh

schema: $(BIN)/edgehook
	$(BIN)/edgehook schema > config/edgehook.schema.json
	$(BIN)/edgehook schema --markdown > docs/configuration.md

clean:
	rm -rf $(VENV) state .pytest_cache .ruff_cache
