# Set-up is part of every target: a fresh clone needs nothing but `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# On this machine torch==2.13.0 is a local CPU wheel; an unpinned torch would pull a CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test install proto readme clean fuzz

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools>=68" wheel

$(VENV)/.deps: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q ".[test,data,plot]"
	touch $@

# The checkout is installed editable: the tree imports as the package (tests/test_layout.py
# also builds a wheel and imports it from elsewhere).
$(VENV)/.installed: $(VENV)/.deps pyproject.toml
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

DEMO := fixtures/caffe/sphereface4_deploy
demo: install
	$(BIN)/caffelayers inspect $(DEMO)/net.prototxt $(DEMO)/weights.caffemodel
	@echo; echo "== to ONNX, run in onnxruntime, compared with Caffe's outputs"
	$(BIN)/caffelayers convert $(DEMO)/net.prototxt $(DEMO)/weights.caffemodel --to onnx -o out/demo/sphereface4.onnx --reference $(DEMO)/reference.npz
	@echo; echo "== to PyTorch source (model.py + weights.pt), imported and run, compared with Caffe's outputs"
	$(BIN)/caffelayers convert $(DEMO)/net.prototxt $(DEMO)/weights.caffemodel --to pytorch -o out/demo/sphereface4_pytorch --reference $(DEMO)/reference.npz
	@echo; echo "== every recorded blob, through the Net runtime and onnxruntime"
	$(BIN)/caffelayers verify $(DEMO)
	$(BIN)/caffelayers verify $(DEMO) --runtime onnxruntime

test: install
	$(BIN)/pytest -q

# The adversarial suite at full budget: every corpus case through every entry point, and
# thousands of Hypothesis examples per property (make test runs a fixed, small budget).
fuzz: install
	HYPOTHESIS_PROFILE=fuzz ADVERSARIAL_FULL=1 $(BIN)/pytest -q tests/adversarial

# Regenerate proto/caffe_pb2.py from proto/caffe.proto (the generated file is committed).
proto: | $(BIN)/python
	$(BIN)/python -m pip install -q "grpcio-tools==1.85.1"
	cd proto && ../$(BIN)/python -m grpc_tools.protoc -I. --python_out=. caffe.proto

clean:
	rm -rf $(VENV) build *.egg-info

# Rewrite the README's layer table from the registry and its command synopses from the
# parser (tests fail while they are stale).
readme: install
	$(BIN)/python -c "import re, pathlib; from caffelayers.cli import layer_table; p = pathlib.Path('README.md'); s = p.read_text(); p.write_text(re.sub(r'(<!-- layers:start -->\n).*?(<!-- layers:end -->)', lambda m: m.group(1) + layer_table() + '\n' + m.group(2), s, flags=re.S))"
	$(BIN)/python -c "import pathlib; from caffelayers.cli import rewrite_readme_synopses; p = pathlib.Path('README.md'); p.write_text(rewrite_readme_synopses(p.read_text()))"
