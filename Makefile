# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch first: 2.13.0 is on disk as a CPU build; any other version would download GBs.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest

demo: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/sequnlearn demo --out runs/demo

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/unlearn_step.py --small
	HF_HUB_OFFLINE=1 $(PY) benchmarks/eval_mcq.py

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
