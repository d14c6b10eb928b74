# The two commands of the README: `make run` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= config.example.toml

.PHONY: run test lint typecheck pytest dev clean

$(BIN)/offload: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

run: $(BIN)/offload
	mkdir -p var
	$(BIN)/offload serve --config $(CONFIG)

test: lint typecheck pytest

lint: $(BIN)/offload
	$(BIN)/ruff check daemon tests bench
	$(BIN)/ruff format --check daemon tests bench

typecheck: $(BIN)/offload
	$(BIN)/mypy

pytest: $(BIN)/offload
	$(BIN)/pytest -q

# Both of adev's servers on 127.0.0.1 (daemon/dev.py sees to it); its aux server (livereload)
# on 8090, not its default port + 1: 8081 is config.example.toml's example callback.
dev: $(BIN)/offload
	$(BIN)/adev runserver daemon/dev.py --app-factory create_app --port 8080 --aux-port 8090

clean:
	rm -rf $(VENV) var .mypy_cache .pytest_cache .ruff_cache
