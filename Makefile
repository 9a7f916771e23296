# fedclip: set-up, demo, tests. `make demo` and `make test` install on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.14.1 / torchvision 0.29.1: the pair whose wheels work together (and that the
# offline build machines serve); pip resolves them before the project's own dependencies.
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test test-all lint bench quickstarts quickstarts-b2n quick-suite clean flower-demo

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PKGS)
	$(BIN)/pip install --quiet -e ".[dev,flower]"
	touch $@

demo: install
	$(BIN)/fedclip fit --config configs/quickstart.yaml --run_name quickstart-$$(date +%Y%m%d-%H%M%S)

# the quickstart on Flower's simulation engine, one simulated SuperNode per client. `flwr run`
# leaves a local SuperLink running in the background (ports 39091 and 39093).
flower-demo: install
	$(BIN)/pip install --quiet -e ".[flower-simulation]"
	PATH="$(CURDIR)/$(BIN):$$PATH" FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
	    $(BIN)/flwr run flower_app --stream --federation-config "num-supernodes=4" \
	    --run-config "config='$(CURDIR)/configs/quickstart.yaml' overrides='--run_name=flower-quickstart-$$(date +%Y%m%d-%H%M%S)'"

# the fast tier (about 7.5 minutes on 2 cores); test-all adds the slow and distributed tiers
test: install
	$(BIN)/pytest -q

test-all: install
	$(BIN)/pytest -q -m ""

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf runs .pytest_cache .ruff_cache

bench: install
	$(BIN)/python benchmarks/bench.py --out benchmarks/results

# every registered method's offline quickstart, one table (personal, global, dual)
quickstarts: install
	$(BIN)/python benchmarks/quickstarts.py --out benchmarks/results

# every registered method's offline quickstart over 2 seeds, one table (runs/suites/quick/)
quick-suite: install
	$(BIN)/fedclip suite --config configs/suites/quick.yaml --jobs 2

quickstarts-b2n: install
	$(BIN)/python benchmarks/quickstarts.py --b2n --out benchmarks/results
