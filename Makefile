# Two commands on a fresh machine; each installs what it needs into .venv first.
#   make demo   - train a small GPT with ZeRO-3 on 2 CPU ranks (no downloads)
#   make test   - the test suite (real multi-process gloo groups, Triton kernels interpreted)
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; a bare `torch` would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: demo test install clean
install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: install
	$(PY) examples/train_gpt.py

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
