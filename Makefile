# k3lab: the README's two commands are `make quickstart` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: venv quickstart test test-all lint format docs browser claims claims-quick mutation bench-autoencoder bench-text2image bench-unet bench-cell bench-convert clean

# Create or refresh the virtual environment; torch/torchvision are pinned (they lie on the
# development machines' disk; anything looser pulls multi-GB builds).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# Main job on the embedded default: a small ablation (block x prior), evaluated, tracked in MLflow, with the table printed.
quickstart: $(STAMP)
	$(PY) -m k3lab.ablation -m experiment=ablation_tiny

# The annotation-page tests drive Debian's chromium + chromium-driver: installed here when missing (as root or with
# sudo); otherwise the command to run is printed and the tests that need it fail, naming it.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" -eq 0 ]; then SUDO=""; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo"; \
	  else echo "make: the browser tests need Debian's chromium and chromium-driver: sudo apt-get install chromium chromium-driver"; exit 0; fi; \
	  echo "make: installing Debian's chromium and chromium-driver for the browser tests"; \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
	    || { $$SUDO apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium chromium-driver >/dev/null; } \
	    || echo "make: could not install chromium; run: sudo apt-get install chromium chromium-driver"; \
	fi

test: $(STAMP) browser
	$(PY) -m pytest -q

test-all: $(STAMP) browser
	$(PY) -m pytest -q -m ''

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	PYRIGHT_PYTHON_IGNORE_WARNINGS=1 $(VENV)/bin/pyright

# The documentation site (docs/ + the API reference from docstrings) into build/site, strict: a broken link fails.
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

# The claims ledger (docs/claims.yaml): re-run every figure the README and docs state, stated vs measured now.
# `make claims` runs them all (hours: the main job is one of them); `make claims-quick` those under a minute each;
# `make claims ONLY=movq_tiny_parameters_px` one (ONLY takes a claim id; MAX_COST=<seconds> bounds a full run;
# SCRIPT="reproduce.py main-job --json" those one script backs: one run of the main job re-checks all of them).
ONLY ?=
MAX_COST ?=
claims: $(STAMP)
	$(PY) benchmarks/claims.py check
	$(PY) benchmarks/claims.py run $(if $(ONLY),--only $(ONLY)) $(if $(MAX_COST),--max-cost $(MAX_COST)) $(if $(SCRIPT),--script "$(SCRIPT)")

claims-quick: $(STAMP)
	$(PY) benchmarks/claims.py check
	$(PY) benchmarks/claims.py run --quick

# Mutation testing of the numeric core ([tool.mutmut] in pyproject.toml: evaluation statistics, the paired design,
# schedules, samplers, resume state) against the fast tests that cover it; ~20-40 min on 2 cores, not in CI.
# Scores per module (and survivors: `.venv/bin/mutmut show <name>`), failing under 85% killed.
mutation: $(STAMP)
	$(VENV)/bin/mutmut run || true
	$(PY) benchmarks/mutation_scores.py --survivors --min-score 0.85

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench-autoencoder: $(STAMP)
	$(PY) benchmarks/autoencoder_tiny.py

bench-text2image: $(STAMP)
	$(PY) benchmarks/text2image_tiny.py

bench-unet: $(STAMP)
	$(PY) benchmarks/unet_vs_diffusers.py

bench-cell: $(STAMP)
	$(PY) benchmarks/cell_unet.py

bench-convert: $(STAMP)
	$(PY) benchmarks/convert_memory.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
