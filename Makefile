# fedclip: set-up, demo, tests. `make demo` and `make test` install on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.14.1 / torchvision 0.29.1: the pair whose wheels work together (and that the
# offline build machines serve); pip resolves them before the project's own dependencies.
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PKGS)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

demo: install
	$(BIN)/fedclip fit --config configs/quickstart.yaml --run_name quickstart-$$(date +%Y%m%d-%H%M%S)

test: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf runs .pytest_cache .ruff_cache

bench: install
	$(BIN)/python benchmarks/bench.py --out benchmarks/results
