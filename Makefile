# The two commands: `make run` and `make test`. Both build .venv themselves.
#   make run    edgehook with only its runtime dependencies, on simulated pins
#               (config/demo.yaml), beside a debug receiver that prints its webhooks
#   make test   the same venv plus the test tools, then the whole suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= config/demo.yaml
# config/demo.yaml posts its webhooks to http://127.0.0.1:8089/; change both together.
RECEIVER_PORT ?= 8089

.PHONY: run test lint bench bench-peers schema clean

# What running needs: edgehook and its runtime dependencies.
$(BIN)/edgehook: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e .
	@touch $@

# What testing needs on top: the `test` extras (pytest, hypothesis, ruff, ...).
$(VENV)/.test-extras: pyproject.toml $(BIN)/edgehook
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $@

# The receiver starts first and is stopped when the daemon stops. Ctrl-C reaches the
# daemon from the terminal (the receiver, started in the background, ignores it); a
# SIGTERM to this shell is passed on to the daemon.
run: $(BIN)/edgehook
	@echo "make run: ring the doorbell with  $(BIN)/edgehook sim click doorbell -c $(CONFIG)"
	@echo "make run: or open http://127.0.0.1:8080/ and press it there; Ctrl-C stops"
	@$(BIN)/edgehook receive --port $(RECEIVER_PORT) & receiver=$$!; \
	trap 'kill $$receiver 2>/dev/null' EXIT; \
	$(BIN)/edgehook run -c $(CONFIG) --simulate & daemon=$$!; \
	trap : INT; trap 'kill -TERM $$daemon 2>/dev/null' TERM; \
	wait $$daemon; status=$$?; \
	if [ $$status -gt 128 ]; then wait $$daemon; status=$$?; fi; \
	exit $$status

test: $(VENV)/.test-extras
	@bash tests/ensure-mosquitto.sh
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(VENV)/.test-extras
	$(BIN)/ruff check .

bench: $(BIN)/edgehook
	$(BIN)/python bench/run.py

bench-peers: $(BIN)/edgehook
	bash bench/peers.sh

schema: $(BIN)/edgehook
	$(BIN)/python tools/schema_export.py

clean:
	rm -rf $(VENV) state .pytest_cache .ruff_cache
