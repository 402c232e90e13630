# Development tasks: `make test`, `make demo`, `make clean`.
# The virtualenv is built once from constraints.txt and rebuilt when the
# package metadata or the pinned versions change.

PYTHON ?= python3
VENV = .venv
VENV_STAMP = $(VENV)/.install-stamp
PIP = $(VENV)/bin/pip --disable-pip-version-check

PYTEST_ARGS ?=

DEMO_CONFIG ?= configs/mnist_mol_cpu.yaml
DEMO_OUTPUT_DIR ?= outputs/mnist_mol_cpu
# Guidance scale, scheduler and step count for the demo grid, e.g.
# `make demo DEMO_SAMPLE_ARGS="--guidance_scale 2.5"`.
DEMO_SAMPLE_ARGS ?= --guidance_scale 1 --scheduler ddim --num_inference_steps 50 --seed 0

.PHONY: install test demo clean distclean

install: $(VENV_STAMP)

$(VENV_STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt --upgrade pip
	$(PIP) install -c constraints.txt -e ".[dev]"
	touch $@

test: $(VENV_STAMP)
	$(VENV)/bin/python -m pytest -q tests $(PYTEST_ARGS)

demo: $(VENV_STAMP)
	$(VENV)/bin/python train_unet.py --config $(DEMO_CONFIG) --output_dir $(DEMO_OUTPUT_DIR)
	$(VENV)/bin/python sample.py --model_dir $(DEMO_OUTPUT_DIR) --class_labels all \
		--num_images 8 --output $(DEMO_OUTPUT_DIR)_grid.png $(DEMO_SAMPLE_ARGS)

clean:
	rm -rf outputs build dist .pytest_cache *.egg-info
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
