# k3lab: the README's two commands are `make quickstart` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: venv quickstart test test-all bench-autoencoder bench-text2image bench-unet bench-convert clean

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

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

bench-autoencoder: $(STAMP)
	$(PY) benchmarks/autoencoder_tiny.py

bench-text2image: $(STAMP)
	$(PY) benchmarks/text2image_tiny.py

bench-unet: $(STAMP)
	$(PY) benchmarks/unet_vs_diffusers.py

bench-convert: $(STAMP)
	$(PY) benchmarks/convert_memory.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
