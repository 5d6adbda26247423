# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test demo findings upstream-comparison bench clean

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

# docs/toy-world-findings.md: the reference's sweeps on the toy world (toy-l2, toy-kl, and L2 at KL's
# coefficients, toy-l2-vs-kl: five unlearning seeds each, sweep points two at a time on one thread each,
# then each sweep's baseline row); the attack on every unlearning seed of the best L2 and best KL setting,
# in cloze and in letter format, with its controls (the base model, benign text, and a corpus about the
# same entities that does not state the scored answers); the report and the seven findings decided by
# `report --findings`; the shipped files copied into docs/toy-world-findings/. About 1 h 25 min on 2 idle
# cores (measured 2026-12-04, one thread each: a sweep point 92 s with its two-style evaluation, an attack
# 42 s; 75 points two at a time, then 2 x 31 attacks two at a time). Interrupted, run it again: finished
# sweep points are kept (the tamper step starts over).
FINDINGS := runs/findings
SEEDS    := 1 2 3 4 5
SWEEPS   := toy-l2 toy-kl toy-l2-vs-kl
SWEEP1   := env OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(VENV)/bin/sequnlearn sweep
TAMPER   := HF_HUB_OFFLINE=1 $(VENV)/bin/sequnlearn tamper
ATTACKED := $(foreach s,$(SEEDS),runs/sweeps/toy-l2/remove_coef=50_seed=$(s)) \
            $(foreach s,$(SEEDS),runs/sweeps/toy-kl/remove_coef=5_retain_coef=100_seed=$(s))
findings: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/sequnlearn toyworld build --out runs/toyworld
	for s in $(SWEEPS); do \
	  n=$$($(SWEEP1) $$s --dry-run | tail -1 | cut -d' ' -f1); \
	  seq 0 $$((n - 1)) | sed "s/^/$$s /"; \
	done | xargs -P 2 -L 1 sh -c '$(SWEEP1) "$$0" --only "$$1" > /dev/null' || exit 1
	for s in $(SWEEPS); do $(SWEEP1) $$s --baseline > /dev/null || exit 1; done
	printf 'cloze\nletter\n' | xargs -P 2 -L 1 sh -c 'OMP_NUM_THREADS=1 $(TAMPER) $(ATTACKED) --preset toy-tamper \
	  --controls base,benign,no-answer --seeds 1 --style "$$0" --no-answer-data runs/toyworld/corpus/forget_no_answers.jsonl \
	  --out $(FINDINGS)/tamper-"$$0" --overwrite > /dev/null' || exit 1
	HF_HUB_OFFLINE=1 $(VENV)/bin/sequnlearn report $(foreach s,$(SWEEPS),runs/sweeps/$(s)) $(FINDINGS)/tamper-cloze \
	  $(FINDINGS)/tamper-letter --out $(FINDINGS)/report --findings
	mkdir -p docs/toy-world-findings
	cd $(FINDINGS)/report && cp report_seeds.csv report_styles.csv tamper_curves.csv findings.md findings.json \
	  tradeoff.png forget_vs_remove_coef.png tamper_cloze.png tamper_letter.png $(CURDIR)/docs/toy-world-findings/
	cp $(FINDINGS)/report/report.csv docs/toy-world-findings/sweeps.csv
	cp $(FINDINGS)/report/losses.png docs/toy-world-findings/losses_toy-l2.png

# docs/upstream-comparison/: the reference authors' later options (#27: max-entropy, top-K entropy, full-parameter
# mode over layers 7..4 and over every layer, a keyword mask) each against today's toy-l2 on the toy world: the
# sweep toy-upstream (6 settings x 3 unlearning seeds, cloze and letter; points two at a time on one thread each),
# the attack on every unlearned model (toy-tamper: 50 steps, no controls) in cloze and in letter format, then
# `report --against forget_loss=random_ce` (comparison.md / .json: each setting against toy-l2 per format on forget,
# retain and attacked forget accuracy), its files copied into docs/upstream-comparison/. About 30 min on 2 idle
# cores (estimated from the findings' timings: a LoRA point 92 s, a full-parameter point 60 s, an attack 42 s).
# Interrupted, run it again: finished sweep points are kept (the attacks start over).
UPSTREAM := runs/upstream-comparison
upstream-comparison: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/sequnlearn toyworld build --out runs/toyworld
	n=$$($(SWEEP1) toy-upstream --dry-run | tail -1 | cut -d' ' -f1); \
	seq 0 $$((n - 1)) | xargs -P 2 -L 1 sh -c '$(SWEEP1) toy-upstream --only "$$0" > /dev/null' || exit 1
	$(SWEEP1) toy-upstream --baseline > /dev/null
	printf 'cloze\nletter\n' | xargs -P 2 -L 1 sh -c 'OMP_NUM_THREADS=1 $(TAMPER) runs/sweeps/toy-upstream/*seed=* \
	  --preset toy-tamper --set "controls=[]" --seeds 1 --style "$$0" --out $(UPSTREAM)/tamper-"$$0" --overwrite \
	  > /dev/null' || exit 1
	HF_HUB_OFFLINE=1 $(VENV)/bin/sequnlearn report runs/sweeps/toy-upstream $(UPSTREAM)/tamper-cloze \
	  $(UPSTREAM)/tamper-letter --out $(UPSTREAM)/report --against forget_loss=random_ce
	mkdir -p docs/upstream-comparison
	cd $(UPSTREAM)/report && cp comparison.md comparison.json report_seeds.csv report_styles.csv tamper_curves.csv \
	  tradeoff.png tamper_cloze.png tamper_letter.png $(CURDIR)/docs/upstream-comparison/

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/unlearn_step.py --small
	HF_HUB_OFFLINE=1 $(PY) benchmarks/eval_mcq.py

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
