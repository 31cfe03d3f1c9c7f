# Everything installs into .venv from the project's own files; each target sets it up on first use.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp
# PyTorch is pinned to the release available from the local wheel mirror (no multi-GB download).
TORCH := torch==2.14.1 torchvision==0.29.1

# FFCV builds from source against OpenCV and libjpeg-turbo (Debian: libopencv-dev libturbojpeg0-dev).
FFCV_APT := libopencv-dev libturbojpeg0-dev pkg-config

.PHONY: install demo test test-loaders bench gpu-check ffcv loaders nvimgcodec parquet cluster s3 clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet $(TORCH)
	$(VENV)/bin/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Optional: FFCV .beton support (`.[ffcv]`); installs the system libraries first when run as root.
ffcv: $(STAMP)
	@if pkg-config --exists opencv4 libturbojpeg; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(FFCV_APT); \
	else \
		echo "make ffcv: FFCV needs OpenCV and libjpeg-turbo headers; as root run:" >&2; \
		echo "  apt-get install -y $(FFCV_APT)   (or your system's equivalents), then make ffcv" >&2; \
		exit 2; \
	fi
	$(VENV)/bin/pip install --quiet -e ".[dev,ffcv]"

# Optional: benchmarks/loaders.py's peers (`.[loaders]`, FFCV through `make ffcv`). Mosaic Streaming and DALI
# pin numpy / packaging below this environment's, so they go in without their pins (--no-deps); the extra
# holds their runtime dependencies.
LOADERS_NODEPS := mosaicml-streaming==0.13.0 nvidia-dali-cuda130==2.4.0
loaders: ffcv
	$(VENV)/bin/pip install --quiet -e ".[dev,loaders]"
	$(VENV)/bin/pip install --quiet --no-deps $(LOADERS_NODEPS)

# Optional: nvImageCodec, for decoder="roi" (region-of-interest decode on the CPU) and data.decode: gpu.
nvimgcodec: $(STAMP)
	$(VENV)/bin/pip install --quiet -e ".[dev,nvimgcodec]"

# Optional: parquet and Hugging Face `datasets` sources for make_shards (`.[parquet]`).
parquet: $(STAMP)
	$(VENV)/bin/pip install --quiet -e ".[dev,parquet]"

# Optional: distributed packing on Dask (`make_shards pack --dask`, `.[cluster]`).
cluster: $(STAMP)
	$(VENV)/bin/pip install --quiet -e ".[dev,cluster]"

# Optional: s3:// URLs through s3fs (`.[s3]`); the tests run against moto's S3 server on 127.0.0.1.
s3: $(STAMP)
	$(VENV)/bin/pip install --quiet -e ".[dev,s3]"

demo: $(STAMP)
	$(VENV)/bin/picstream-demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

# benchmarks/loaders.py --quick in full (its HTTP and multi-crop rows too; `make test` runs the local rows).
test-loaders: loaders
	$(VENV)/bin/python -m pytest -q -m loaders

bench: $(STAMP)
	for b in benchmarks/*.py; do $(VENV)/bin/python $$b --quick || exit 1; done

# The CUDA path end to end on one GPU in under 9 minutes (benchmarks/README.md, "GPU check").
gpu-check: $(STAMP)
	$(VENV)/bin/python benchmarks/gpu_check.py --out runs/gpu-check

clean:
	rm -rf runs shards/demo-* $(VENV)
