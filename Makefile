# Everything installs into .venv from the project's own files; each target sets it up on first use.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp
# PyTorch is pinned to the release available from the local wheel mirror (no multi-GB download).
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test bench gpu-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet $(TORCH)
	$(VENV)/bin/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/picstream-demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	for b in benchmarks/*.py; do $(VENV)/bin/python $$b --quick || exit 1; done

# The CUDA path end to end on one GPU in under 9 minutes (benchmarks/README.md, "GPU check").
gpu-check: $(STAMP)
	$(VENV)/bin/python benchmarks/gpu_check.py --out runs/gpu-check

clean:
	rm -rf runs shards/demo-* $(VENV)
