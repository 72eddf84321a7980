# The two commands of the README: `make demo` and `make test`. Each sets everything up first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch that lies on this kind of machine's disk. A venv that already has a
# torch (for example a CUDA build on a GPU box) keeps it.
TORCH_CPU ?= torch==2.13.0

.PHONY: venv test test-fast demo lint clean-demo

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_CPU)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

test: venv
	$(PY) -m pytest -q -ra --durations=25

test-fast: venv
	$(PY) -m pytest -q -ra -m "not slow and not slurm"

lint: venv
	$(VENV)/bin/ruff check bigtx tests tools

demo: venv
	$(VENV)/bin/bigtx demo

clean-demo:
	rm -rf demo runs/demo
