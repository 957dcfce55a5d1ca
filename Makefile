# Everything runs inside .venv (created on first use, re-synced when requirements change).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
MMSEG_STAMP := $(VENV)/.mmseg-installed
export PYTHONHASHSEED := 0

.PHONY: all venv mmseg demo test bench clean

all: venv

venv: $(STAMP)

$(STAMP): requirements/core.txt requirements/dev.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check "pip==26.1.1"
	$(PIP) install -q --disable-pip-version-check -r requirements/core.txt -r requirements/dev.txt
	$(PIP) install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PIP) check
	touch $@

# Full mmcv is built from source once (about 15 min on 2 idle cores) and cached outside the repo.
mmseg: $(MMSEG_STAMP)

$(MMSEG_STAMP): $(STAMP) requirements/mmseg.txt tools/install_mmseg.sh
	bash tools/install_mmseg.sh $(PY)
	touch $@

demo: venv
	$(PY) tools/demo.py

test: venv mmseg
	$(PY) -m pytest tests

bench: venv
	$(PY) tools/benchmark_backbone.py --quick --json bench_backbone.json

clean:
	rm -rf $(VENV) .pytest_cache
