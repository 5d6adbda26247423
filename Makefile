# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test demo findings bench clean

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

# docs/toy-world-findings.md: the reference's sweeps on the toy world (3 seeds), the attack with its
# controls (on three attack seeds, and on the three unlearning seeds; in letter format too), and the report (about an hour
# on 2 idle cores; sweep points two at a time, one thread each).
FINDINGS := runs/findings
SWEEP1   := env OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(VENV)/bin/sequnlearn sweep
findings: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/sequnlearn toyworld build --out runs/toyworld
	for s in toy-l2 toy-kl; do \
	  n=$$($(SWEEP1) $$s --dry-run | tail -1 | cut -d' ' -f1); \
	  seq 0 $$((n - 1)) | xargs -P 2 -I{} $(SWEEP1) $$s --only {} > /dev/null || exit 1; \
	  $(SWEEP1) $$s > /dev/null || exit 1; \
	done
	HF_HUB_OFFLINE=1 $(VENV)/bin/sequnlearn tamper runs/sweeps/toy-l2/remove_coef=50_seed=1 \
	  runs/sweeps/toy-kl/remove_coef=5_retain_coef=100_seed=1 --preset toy-tamper --seeds 1,2,3 \
	  --out $(FINDINGS)/tamper --overwrite
	HF_HUB_OFFLINE=1 $(VENV)/bin/sequnlearn tamper $(foreach s,1 2 3,runs/sweeps/toy-l2/remove_coef=50_seed=$(s)) \
	  $(foreach s,1 2 3,runs/sweeps/toy-kl/remove_coef=5_retain_coef=100_seed=$(s)) --preset toy-tamper \
	  --controls benign --seeds 1 --out $(FINDINGS)/tamper-unlearning-seeds --overwrite
	HF_HUB_OFFLINE=1 $(VENV)/bin/sequnlearn tamper runs/sweeps/toy-l2/remove_coef=50_seed=1 \
	  runs/sweeps/toy-kl/remove_coef=5_retain_coef=100_seed=1 --preset toy-tamper --seeds 1,2,3 --style letter \
	  --out $(FINDINGS)/tamper-letter --overwrite
	HF_HUB_OFFLINE=1 $(VENV)/bin/sequnlearn report runs/sweeps/toy-l2 runs/sweeps/toy-kl $(FINDINGS)/tamper \
	  --out $(FINDINGS)/report

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/unlearn_step.py --small
	HF_HUB_OFFLINE=1 $(PY) benchmarks/eval_mcq.py

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
