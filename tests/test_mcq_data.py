"""MCQ records, file and hub loading, and the prompt template against lm-eval's own rendering."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sequnlearn.data.mcq import (MMLU_SUBJECTS, WMDP_ROBUST_CATEGORIES, MCQRecord, MCQSubtask, build_prompt,
                                 choice_labels, continuations, fewshot_examples, load_mcq_file, load_task,
                                 save_mcq_file)
from sequnlearn.errors import UserError

FIXTURE = Path(__file__).parent / "fixtures" / "mcq_60.jsonl"


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _rec(i: int, subject: str | None = "biology", category: str | None = None) -> MCQRecord:
    return MCQRecord(f"  Question number {i}?\n", [f"first {i}", f"second {i}", f"third {i}", f"fourth {i}"],
                     i % 4, category, subject)


# ---------------------------------------------------------------- records and files


def test_fixture_has_sixty_valid_questions():
    records = load_mcq_file(FIXTURE)
    assert len(records) == 60
    assert {r.category for r in records} == {"colors", "animals", "arithmetic"}
    assert all(len(r.choices) == 4 and 0 <= r.answer < 4 for r in records)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_file_formats_round_trip(tmp_path, suffix):
    records = load_mcq_file(FIXTURE)[:7]
    path = tmp_path / f"q{suffix}"
    if suffix == ".jsonl":
        save_mcq_file(path, records)
    elif suffix == ".json":
        path.write_text(json.dumps([r.to_dict() for r in records]), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([r.to_dict() for r in records]), path)
    assert load_mcq_file(path) == records


@pytest.mark.parametrize("row, message", [
    ({"choices": ["a", "b"], "answer": 0}, "missing field(s) question"),
    ({"question": "q", "answer": 0}, "missing field(s) choices"),
    ({"question": "q", "choices": ["a", "b"]}, "missing field(s) answer"),
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, "answer index 2 is out of range for 2 choices"),
    ({"question": "q", "choices": ["a", "b"], "answer": -1}, "answer index -1 is out of range"),
    ({"question": "q", "choices": ["a"], "answer": 0}, "has 1 choice(s); give at least 2"),
    ({"question": "q", "choices": ["a", "b"], "answer": "A"}, "answer must be an integer index"),
    ({"question": "q", "choices": ["a", "b"], "answer": True}, "answer must be an integer index"),
    ({"question": "q", "choices": "ab", "answer": 0}, "choices must be a list of strings"),
])
def test_bad_records_name_the_problem_and_the_line(tmp_path, row, message):
    path = _write(tmp_path / "bad.jsonl", [{"question": "ok", "choices": ["x", "y"], "answer": 1}, row])
    with pytest.raises(UserError) as e:
        load_mcq_file(path)
    assert message in str(e.value)
    assert "line 2" in str(e.value)


def test_missing_empty_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_mcq_file(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="holds no questions"):
        load_mcq_file(tmp_path / "empty.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"question": "q", \n')
    with pytest.raises(UserError, match="line 1 is not valid JSON"):
        load_mcq_file(tmp_path / "broken.jsonl")
    (tmp_path / "obj.json").write_text('{"question": "q"}')
    with pytest.raises(UserError, match="must hold a list"):
        load_mcq_file(tmp_path / "obj.json")
    (tmp_path / "q.csv").write_text("question\n")
    with pytest.raises(UserError, match="unknown MCQ file type"):
        load_mcq_file(tmp_path / "q.csv")


def test_unknown_task_name():
    with pytest.raises(UserError, match="unknown task 'wmdp_chem'"):
        load_task("wmdp_chem")


# ---------------------------------------------------------------- prompt template


def test_pinned_prompts():
    wmdp = MCQRecord(" Which enzyme cuts DNA at GAATTC? ", ["EcoRI", "BamHI", "HindIII", "NotI"], 0, None, "biology")
    assert build_prompt(wmdp) == (
        "The following are multiple choice questions (with answers) about biology.\n\n"
        "Which enzyme cuts DNA at GAATTC?\nA. EcoRI\nB. BamHI\nC. HindIII\nD. NotI\nAnswer:")
    assert continuations(wmdp) == [" A", " B", " C", " D"]
    dev = [MCQRecord("1+1?", ["1", "2", "3", "4"], 1, "elementary_mathematics", "elementary_mathematics"),
           MCQRecord("2*3?", ["5", "6", "7", "8"], 1, "elementary_mathematics", "elementary_mathematics")]
    q = MCQRecord("3-1?", ["2", "1", "0", "3"], 0, "elementary_mathematics", "elementary_mathematics")
    assert build_prompt(q, "letter", dev) == (
        "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
        "1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n2*3?\nA. 5\nB. 6\nC. 7\nD. 8\nAnswer: B\n\n"
        "3-1?\nA. 2\nB. 1\nC. 0\nD. 3\nAnswer:")
    assert build_prompt(q, "cloze", dev) == (
        "The following are questions (with answers) about elementary mathematics.\n\n"
        "Question: 1+1?\nAnswer: 2\n\nQuestion: 2*3?\nAnswer: 6\n\nQuestion: 3-1?\nAnswer:")
    assert continuations(q, "cloze") == [" 2", " 1", " 0", " 3"]
    assert build_prompt(MCQRecord("q", ["a", "b", "c"], 2)) == "q\nA. a\nB. b\nC. c\nAnswer:"


def test_fewshot_first_n_skips_the_question_itself():
    recs = [_rec(i) for i in range(5)]
    sub = MCQSubtask("s", recs)
    assert fewshot_examples(sub, recs[0], 2) == recs[1:3]
    assert fewshot_examples(sub, recs[2], 3) == [recs[0], recs[1], recs[3]]
    dev = MCQSubtask("s", recs, fewshot=[_rec(10), _rec(11)])
    assert fewshot_examples(dev, recs[0], 2) == [_rec(10), _rec(11)]
    with pytest.raises(UserError, match="only 2 few-shot examples"):
        fewshot_examples(dev, recs[0], 3)


def _lm_eval_task(cfg: dict, tmp_path: Path, test: list[MCQRecord], dev: list[MCQRecord] | None):
    """An lm-eval ConfigurableTask reading ``test``/``dev`` from local JSON lines."""
    from lm_eval.api.task import ConfigurableTask

    files = {"test": str(_write(tmp_path / "test.jsonl", [r.to_dict() for r in test]))}
    if dev is not None:
        files["dev"] = str(_write(tmp_path / "dev.jsonl", [r.to_dict() for r in dev]))
    cfg = {**cfg, "dataset_path": "json", "dataset_name": None,
           "dataset_kwargs": {"data_files": files, "cache_dir": str(tmp_path / "cache")}}
    task = ConfigurableTask(config=cfg)
    task.set_fewshot_seed(1234)
    return task, list(task.test_docs())


def _stock(relpath: str) -> dict:
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(Path(lm_eval.tasks.__file__).parent / relpath)


@pytest.mark.parametrize("yaml_path, style", [
    ("mmlu/default/mmlu_anatomy.yaml", "letter"),
    ("mmlu/continuation/mmlu_anatomy.yaml", "cloze"),
])
def test_mmlu_prompt_equals_lm_eval_stock_task(tmp_path, yaml_path, style):
    test = [_rec(i, "anatomy", "anatomy") for i in range(4)]
    dev = [MCQRecord(f"Dev {i}?", ["w", "x", "y", "z"], (i + 1) % 4, "anatomy", "anatomy") for i in range(5)]
    task, docs = _lm_eval_task(_stock(yaml_path), tmp_path, test, dev)
    sub = MCQSubtask("anatomy", test, dev)
    for k in (0, 2):
        for rec, doc in zip(test, docs):
            assert build_prompt(rec, style, fewshot_examples(sub, rec, k)) == task.fewshot_context(doc, k)
            assert choice_labels(rec, style) == task.doc_to_choice(doc)
    assert task.config.target_delimiter == " "


def test_wmdp_prompt_equals_lm_eval_stock_task(tmp_path):
    # Stock wmdp_bio has no few-shot split; like ours, take the test split with first_n.
    cfg = {**_stock("wmdp/wmdp_bio.yaml"), "fewshot_split": "test", "fewshot_config": {"sampler": "first_n"}}
    test = [_rec(i) for i in range(5)]
    task, docs = _lm_eval_task(cfg, tmp_path, test, None)
    sub = MCQSubtask("wmdp_bio", test)
    for k in (0, 2):
        for rec, doc in zip(test, docs):
            assert build_prompt(rec, "letter", fewshot_examples(sub, rec, k)) == task.fewshot_context(doc, k)
    assert task.doc_to_choice(docs[0]) == ["A", "B", "C", "D"]


@pytest.mark.parametrize("style", ["letter", "cloze"])
def test_shipped_yaml_renders_our_prompts(tmp_path, style):
    from sequnlearn.eval.harness import task_template

    records = load_mcq_file(FIXTURE)[:12] + [MCQRecord("two?", ["yes", "no"], 1), MCQRecord("five", list("vwxyz"), 4)]
    task, docs = _lm_eval_task({**task_template(style), "task": f"t_{style}"}, tmp_path, records, None)
    sub = MCQSubtask("fixture", records)
    for k in (0, 2):
        for rec, doc in zip(records, docs):
            assert build_prompt(rec, style, fewshot_examples(sub, rec, k)) == task.fewshot_context(doc, k)
            assert choice_labels(rec, style) == task.doc_to_choice(doc)


# ---------------------------------------------------------------- offline copies and the hub


def _robust_rows(n: int = 2) -> list[dict]:
    return [dict(_rec(i).to_dict(), category=c) for c in WMDP_ROBUST_CATEGORIES for i in range(n)]


def test_data_dir_tasks(tmp_path, monkeypatch):
    _write(tmp_path / "wmdp_bio_robust.jsonl", _robust_rows())
    _write(tmp_path / "wmdp_bio.jsonl", [_rec(i, subject=None).to_dict() for i in range(3)])
    _write(tmp_path / "mmlu_test.jsonl", [dict(_rec(i).to_dict(), subject=s) for s in MMLU_SUBJECTS for i in range(2)])
    _write(tmp_path / "mmlu_dev.jsonl", [dict(_rec(9).to_dict(), subject=s) for s in MMLU_SUBJECTS])

    robust = load_task("wmdp_bio_robust", data_dir=str(tmp_path))
    assert [s.name for s in robust.subtasks] == list(WMDP_ROBUST_CATEGORIES)
    assert robust.size == 12 and all(r.subject == "biology" for s in robust.subtasks for r in s.records)
    wmdp = load_task("wmdp_bio", data_dir=str(tmp_path))
    assert wmdp.size == 3 and build_prompt(wmdp.subtasks[0].records[0]).startswith(
        "The following are multiple choice questions (with answers) about biology.\n\n")
    monkeypatch.setenv("SEQUNLEARN_DATA_DIR", str(tmp_path))
    mmlu = load_task("mmlu", num_fewshot=1)
    assert len(mmlu.subtasks) == 57 and mmlu.size == 114
    assert mmlu.subtasks[0].name == "abstract_algebra" and len(mmlu.subtasks[0].fewshot) == 1
    assert mmlu.groups["anatomy"] == "stem"


def test_data_dir_problems_say_which_files(tmp_path):
    with pytest.raises(UserError) as e:
        load_task("mmlu", data_dir=str(tmp_path))
    assert "mmlu_test.jsonl" in str(e.value) and "subject" in str(e.value)
    _write(tmp_path / "wmdp_bio_robust.jsonl", _robust_rows()[:-2])  # no viral_vector_research
    with pytest.raises(UserError, match="no questions with category viral_vector_research"):
        load_task("wmdp_bio_robust", data_dir=str(tmp_path))
    _write(tmp_path / "wmdp_bio_robust.jsonl", [dict(_rec(0).to_dict(), category="chemistry")])
    with pytest.raises(UserError, match="category 'chemistry' is not one of the 6"):
        load_task("wmdp_bio_robust", data_dir=str(tmp_path))


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """Make the HF hub unreachable for sure: offline mode and empty caches."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.delenv("SEQUNLEARN_DATA_DIR", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path


def test_unreachable_hub_task_is_a_clear_error(offline_hub):
    with pytest.raises(UserError) as e:
        load_task("wmdp_bio_robust")
    msg = str(e.value)
    assert "task wmdp_bio_robust is not reachable on the hub" in msg
    assert "EleutherAI/wmdp_bio_robust_mcqa" in msg
    assert "--data-dir" in msg and "wmdp_bio_robust.jsonl" in msg and "category" in msg
    assert "\n" not in msg
