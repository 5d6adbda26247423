"""Multiple-choice questions: the record, local and hub loading, and lm-eval's prompt template.

The prompt follows lm-eval 0.4's ``wmdp`` and ``mmlu`` task YAMLs character for character:

    description            "The following are multiple choice questions (with answers) about biology.\\n\\n"
    k examples, each       doc_text + " " + answer, joined and followed by "\\n\\n"
    doc_text (letter)      "{question.strip()}\\nA. {c0}\\nB. {c1}\\nC. {c2}\\nD. {c3}\\nAnswer:"
    continuations          " A", " B", " C", " D"   (target delimiter " ")

The ``cloze`` style follows lm-eval's ``mmlu_continuation`` tasks: description
"The following are questions (with answers) about {subject}.\\n\\n", doc text
"Question: {question.strip()}\\nAnswer:" and each choice's own text as the continuation.

Few-shot examples come from a task's dev split with lm-eval's ``first_n`` sampler (MMLU). A task
with no dev split (WMDP, local files) takes the first k *other* questions of its test split, which
is what lm-eval does with ``fewshot_split`` set to the test split and the ``first_n`` sampler.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from sequnlearn.config import STYLES, check_style
from sequnlearn.errors import UserError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
LETTER_DESCRIPTION = "The following are multiple choice questions (with answers) about {}.\n\n"
CLOZE_DESCRIPTION = "The following are questions (with answers) about {}.\n\n"
MCQ_SUFFIXES = (".jsonl", ".json", ".parquet")
DATA_DIR_ENV = "SEQUNLEARN_DATA_DIR"

WMDP_ROBUST_ID = "EleutherAI/wmdp_bio_robust_mcqa"
WMDP_ROBUST_SPLIT = "robust"
WMDP_ROBUST_CATEGORIES = (
    "bioweapons_and_bioterrorism",
    "dual_use_virology",
    "enhanced_potential_pandemic_pathogens",
    "expanding_access_to_threat_vectors",
    "reverse_genetics_and_easy_editing",
    "viral_vector_research",
)
WMDP_ID, WMDP_CONFIG, WMDP_SPLIT = "cais/wmdp", "wmdp-bio", "test"
MMLU_ID = "cais/mmlu"

#: MMLU subject -> lm-eval group (``lm_eval/tasks/mmlu/_generate_configs.py``).
MMLU_SUBJECTS: dict[str, str] = {
    "abstract_algebra": "stem", "anatomy": "stem", "astronomy": "stem", "business_ethics": "other",
    "clinical_knowledge": "other", "college_biology": "stem", "college_chemistry": "stem",
    "college_computer_science": "stem", "college_mathematics": "stem", "college_medicine": "other",
    "college_physics": "stem", "computer_security": "stem", "conceptual_physics": "stem",
    "econometrics": "social_sciences", "electrical_engineering": "stem", "elementary_mathematics": "stem",
    "formal_logic": "humanities", "global_facts": "other", "high_school_biology": "stem",
    "high_school_chemistry": "stem", "high_school_computer_science": "stem",
    "high_school_european_history": "humanities", "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences", "high_school_macroeconomics": "social_sciences",
    "high_school_mathematics": "stem", "high_school_microeconomics": "social_sciences",
    "high_school_physics": "stem", "high_school_psychology": "social_sciences",
    "high_school_statistics": "stem", "high_school_us_history": "humanities",
    "high_school_world_history": "humanities", "human_aging": "other", "human_sexuality": "social_sciences",
    "international_law": "humanities", "jurisprudence": "humanities", "logical_fallacies": "humanities",
    "machine_learning": "stem", "management": "other", "marketing": "other", "medical_genetics": "other",
    "miscellaneous": "other", "moral_disputes": "humanities", "moral_scenarios": "humanities",
    "nutrition": "other", "philosophy": "humanities", "prehistory": "humanities",
    "professional_accounting": "other", "professional_law": "humanities", "professional_medicine": "other",
    "professional_psychology": "social_sciences", "public_relations": "social_sciences",
    "security_studies": "social_sciences", "sociology": "social_sciences",
    "us_foreign_policy": "social_sciences", "virology": "other", "world_religions": "humanities",
}

# What --data-dir must hold for each hub task (.jsonl; .json lists and .parquet are read too).
_DATA_DIR_FILES = {
    "wmdp_bio_robust": "wmdp_bio_robust.jsonl with fields question, choices, answer, category (one of the six "
                       "categories; the `robust` split of every config of " + WMDP_ROBUST_ID + ")",
    "wmdp_bio": "wmdp_bio.jsonl with fields question, choices, answer (" + WMDP_ID + ", config wmdp-bio, split test)",
    "mmlu": "mmlu_test.jsonl, and mmlu_dev.jsonl for --num-fewshot > 0, with fields question, choices, answer, "
            "subject (" + MMLU_ID + ", config all, splits test and dev)",
}
HUB_TASKS = tuple(_DATA_DIR_FILES)


@dataclass
class MCQRecord:
    """One multiple-choice question.

    Attributes:
        question: the question text (the template strips surrounding whitespace).
        choices: the answer texts, 2 to 26 of them (lettered A, B, ...).
        answer: index of the correct choice in ``choices``.
        category: what per-category results are grouped by (WMDP-robust category, MMLU subject).
        subject: names the topic in the description line ("... about {subject}."); none, no line.
    """

    question: str
    choices: list[str]
    answer: int
    category: str | None = None
    subject: str | None = None

    def __post_init__(self) -> None:
        problem = _record_problem(self.question, self.choices, self.answer)
        if problem:
            raise UserError(f"MCQ record {self.question[:60]!r}: {problem}")

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON-ready dict."""
        return asdict(self)


@dataclass
class MCQSubtask:
    """A set of questions scored as one lm-eval task (one MMLU subject, one WMDP-robust category).

    Attributes:
        name: subtask name (subject, category or file stem).
        records: the questions evaluated.
        fewshot: dev-split examples for k-shot prompts; ``None``: the test split minus the question.
    """

    name: str
    records: list[MCQRecord]
    fewshot: list[MCQRecord] | None = None


@dataclass
class MCQTask:
    """A named benchmark made of subtasks whose accuracies are pooled weighted by size.

    Attributes:
        name: task name as given by the user (``mmlu``, or a file path).
        subtasks: the subtasks in a fixed order.
        source: where the questions came from (hub id or file path).
        groups: optional subtask -> group name (MMLU's stem/other/social_sciences/humanities).
    """

    name: str
    subtasks: list[MCQSubtask]
    source: str
    groups: dict[str, str] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Number of questions over all subtasks."""
        return sum(len(s.records) for s in self.subtasks)


# ---------------------------------------------------------------- validation


def _record_problem(question: Any, choices: Any, answer: Any) -> str | None:
    """Why a (question, choices, answer) triple is not a valid MCQ, or ``None`` when it is."""
    if not isinstance(question, str):
        return f"question must be a string, got {type(question).__name__}"
    if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) for c in choices):
        return "choices must be a list of strings"
    if len(choices) < 2:
        return f"has {len(choices)} choice(s); give at least 2"
    if len(choices) > len(LETTERS):
        return f"has {len(choices)} choices; at most {len(LETTERS)} can be lettered"
    if isinstance(answer, bool) or not isinstance(answer, int):
        return f"answer must be an integer index into choices, got {answer!r}"
    if not 0 <= answer < len(choices):
        return f"answer index {answer} is out of range for {len(choices)} choices (0..{len(choices) - 1})"
    return None


def record_from_dict(row: dict[str, Any], where: str) -> MCQRecord:
    """Build a record from a dict with fields question, choices, answer (category, subject optional).

    Args:
        row: one question as read from a file or a dataset.
        where: location for error messages, e.g. ``"data.jsonl line 3"``.

    Raises:
        UserError: a field is missing or invalid.
    """
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected an object with fields question, choices, answer; got {type(row).__name__}")
    missing = [k for k in ("question", "choices", "answer") if k not in row or row[k] is None]
    if missing:
        raise UserError(f"{where}: missing field(s) {', '.join(missing)}; every question needs question, choices "
                        f"(list of strings) and answer (index of the correct choice)")
    choices = list(row["choices"]) if isinstance(row["choices"], (list, tuple)) else row["choices"]
    problem = _record_problem(row["question"], choices, row["answer"])
    if problem:
        raise UserError(f"{where}: {problem}")
    category, subject = row.get("category"), row.get("subject")
    return MCQRecord(row["question"], choices, int(row["answer"]),
                     str(category) if category is not None else None, str(subject) if subject is not None else None)


# ---------------------------------------------------------------- local files


def _read_rows(path: Path) -> list[Any]:
    """Rows of a jsonl / json (a list of objects) / parquet file, read through :mod:`sequnlearn.io`."""
    from sequnlearn import io

    suffix, what = path.suffix.lower(), "MCQ file"
    if suffix == ".jsonl":
        return io.read_jsonl(path, what, kind=None)
    if suffix == ".json":
        return io.expect(io.read_json(path, what), list, f"{what} {path}",
                         "a .json MCQ file must hold a list of question objects; use .jsonl for one object per line")
    if suffix == ".parquet":
        return io.read_parquet(path, what)
    raise UserError(f"{path}: unknown MCQ file type {suffix or '(none)'}; use one of {', '.join(MCQ_SUFFIXES)}")


def load_mcq_file(path: str | os.PathLike) -> list[MCQRecord]:
    """Read MCQ records from a ``.jsonl``, ``.json`` (list) or ``.parquet`` file.

    Each question has fields ``question`` (str), ``choices`` (list of str, 2 or more) and
    ``answer`` (int index into choices); ``category`` and ``subject`` are optional.

    Raises:
        UserError: the file is missing, not a regular file (a FIFO, a device), unreadable, empty, or a
            question is invalid.
    """
    p = Path(path)
    if not p.exists() or p.is_dir():
        what = "is a directory" if p.is_dir() else "does not exist"
        raise UserError(f"MCQ file {p} {what}; give a .jsonl/.json/.parquet file with fields "
                        f"question, choices, answer")
    from sequnlearn import io

    rows = _read_rows(io.check_file(p, "MCQ file"))  # a FIFO, device or socket: refused before it is opened
    if not rows:
        raise UserError(f"MCQ file {p} holds no questions; add at least one")
    unit = "line" if p.suffix.lower() == ".jsonl" else "item"
    return [record_from_dict(r, f"{p} {unit} {i}") for i, r in enumerate(rows, 1)]


def save_mcq_file(path: str | os.PathLike, records: Sequence[MCQRecord]) -> None:
    """Write records as JSON lines (atomically), readable by :func:`load_mcq_file`."""
    from sequnlearn.runs import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r.to_dict()) + "\n" for r in records))


def local_task(path: str | os.PathLike) -> MCQTask:
    """A task made of one local MCQ file (one subtask; categories from the ``category`` field)."""
    p = Path(path)
    return MCQTask(name=str(path), subtasks=[MCQSubtask(p.stem, load_mcq_file(p))], source=str(p))


# ---------------------------------------------------------------- hub tasks and their offline copies


class _Unreachable(Exception):
    """A hub dataset could not be loaded (no network, not cached, gated ...)."""


def _hub_rows(path: str, name: str | None, split: str) -> list[dict[str, Any]]:
    """Rows of one split of a hub dataset, through ``datasets.load_dataset`` (uses its cache)."""
    try:
        from datasets import load_dataset

        return load_dataset(path, name, split=split).to_list()
    except Exception as e:  # noqa: BLE001 - any failure of the hub/cache is reported the same way
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise _Unreachable(f"{path} config {name} split {split}: {reason}") from e


def _rows_to_records(rows: list[dict[str, Any]], where: str, **fields: str) -> list[MCQRecord]:
    """Records from dataset rows, with ``fields`` (category/subject) set on each."""
    return [record_from_dict({**r, **fields}, f"{where} row {i}") for i, r in enumerate(rows)]


def _robust_from_hub(num_fewshot: int) -> MCQTask:
    """WMDP-Bio-Robust from the hub: one subtask per category config, split ``robust``."""
    subtasks = []
    for cat in WMDP_ROBUST_CATEGORIES:
        rows = _hub_rows(WMDP_ROBUST_ID, cat, WMDP_ROBUST_SPLIT)
        subtasks.append(MCQSubtask(cat, _rows_to_records(rows, f"{WMDP_ROBUST_ID}/{cat}", category=cat,
                                                         subject="biology")))
    return MCQTask("wmdp_bio_robust", subtasks, f"{WMDP_ROBUST_ID} (split {WMDP_ROBUST_SPLIT})")


def _wmdp_from_hub(num_fewshot: int) -> MCQTask:
    """WMDP-Bio from the hub (``cais/wmdp``, ``wmdp-bio``, test): one subtask."""
    rows = _hub_rows(WMDP_ID, WMDP_CONFIG, WMDP_SPLIT)
    records = _rows_to_records(rows, f"{WMDP_ID}/{WMDP_CONFIG}", subject="biology")
    return MCQTask("wmdp_bio", [MCQSubtask("wmdp_bio", records)], f"{WMDP_ID} ({WMDP_CONFIG}, split {WMDP_SPLIT})")


def _mmlu_from_hub(num_fewshot: int) -> MCQTask:
    """MMLU from the hub: one subtask per subject config, with its dev split when k > 0."""
    subtasks = []
    for subject in MMLU_SUBJECTS:
        test = _hub_rows(MMLU_ID, subject, "test")
        dev = _hub_rows(MMLU_ID, subject, "dev") if num_fewshot > 0 else []
        tag = dict(category=subject, subject=subject)
        subtasks.append(MCQSubtask(subject, _rows_to_records(test, f"{MMLU_ID}/{subject}/test", **tag),
                                   _rows_to_records(dev, f"{MMLU_ID}/{subject}/dev", **tag)))
    return MCQTask("mmlu", subtasks, f"{MMLU_ID} (split test, dev for few-shot)", dict(MMLU_SUBJECTS))


def _find_data_file(data_dir: Path, stem: str, task: str) -> Path:
    """``data_dir/stem.{jsonl,json,parquet}``, the first that exists."""
    for suffix in MCQ_SUFFIXES:
        if (data_dir / f"{stem}{suffix}").is_file():
            return data_dir / f"{stem}{suffix}"
    raise UserError(f"task {task}: data dir {data_dir} has no {stem}.jsonl (or .json/.parquet); put there "
                    f"{_DATA_DIR_FILES[task]}")


def _group_by(records: list[MCQRecord], key: str, allowed: Sequence[str], path: Path) -> dict[str, list[MCQRecord]]:
    """Split records by ``category``/``subject``; every value must be in ``allowed``, and every one present."""
    groups: dict[str, list[MCQRecord]] = {k: [] for k in allowed}
    for i, r in enumerate(records, 1):
        value = getattr(r, key)
        if value not in groups:
            raise UserError(f"{path} question {i}: {key} {value!r} is not one of the {len(allowed)} expected "
                            f"({', '.join(list(allowed)[:6])}, ...); fix the field")
        groups[value].append(r)
    empty = [k for k, v in groups.items() if not v]
    if empty:
        raise UserError(f"{path} has no questions with {key} {', '.join(empty[:5])}; it must hold the whole "
                        f"benchmark ({len(allowed)} {key} values)")
    return groups


def _robust_from_dir(data_dir: Path, num_fewshot: int) -> MCQTask:
    """WMDP-Bio-Robust from ``data_dir/wmdp_bio_robust.*``, split by ``category``."""
    path = _find_data_file(data_dir, "wmdp_bio_robust", "wmdp_bio_robust")
    groups = _group_by(load_mcq_file(path), "category", WMDP_ROBUST_CATEGORIES, path)
    subtasks = [MCQSubtask(c, [MCQRecord(r.question, r.choices, r.answer, c, "biology") for r in rs])
                for c, rs in groups.items()]
    return MCQTask("wmdp_bio_robust", subtasks, str(path))


def _wmdp_from_dir(data_dir: Path, num_fewshot: int) -> MCQTask:
    """WMDP-Bio from ``data_dir/wmdp_bio.*``."""
    path = _find_data_file(data_dir, "wmdp_bio", "wmdp_bio")
    records = [MCQRecord(r.question, r.choices, r.answer, r.category, "biology") for r in load_mcq_file(path)]
    return MCQTask("wmdp_bio", [MCQSubtask("wmdp_bio", records)], str(path))


def _mmlu_from_dir(data_dir: Path, num_fewshot: int) -> MCQTask:
    """MMLU from ``data_dir/mmlu_test.*`` (and ``mmlu_dev.*`` when k > 0), split by ``subject``."""
    test_path = _find_data_file(data_dir, "mmlu_test", "mmlu")
    test = _group_by(load_mcq_file(test_path), "subject", list(MMLU_SUBJECTS), test_path)
    dev: dict[str, list[MCQRecord]] = {s: [] for s in MMLU_SUBJECTS}
    if num_fewshot > 0:
        dev_path = _find_data_file(data_dir, "mmlu_dev", "mmlu")
        dev = _group_by(load_mcq_file(dev_path), "subject", list(MMLU_SUBJECTS), dev_path)
    subtasks = [MCQSubtask(s, [MCQRecord(r.question, r.choices, r.answer, s, s) for r in test[s]],
                           [MCQRecord(r.question, r.choices, r.answer, s, s) for r in dev[s]])
                for s in MMLU_SUBJECTS]
    return MCQTask("mmlu", subtasks, str(test_path), dict(MMLU_SUBJECTS))


_FROM_HUB: dict[str, Callable[[int], MCQTask]] = {
    "wmdp_bio_robust": _robust_from_hub, "wmdp_bio": _wmdp_from_hub, "mmlu": _mmlu_from_hub}
_FROM_DIR: dict[str, Callable[[Path, int], MCQTask]] = {
    "wmdp_bio_robust": _robust_from_dir, "wmdp_bio": _wmdp_from_dir, "mmlu": _mmlu_from_dir}


def load_task(name: str, *, data_dir: str | os.PathLike | None = None, num_fewshot: int = 0) -> MCQTask:
    """Load a benchmark by name (``wmdp_bio_robust``, ``wmdp_bio``, ``mmlu``) or a local MCQ file path.

    Hub tasks are read from ``data_dir`` (or ``$SEQUNLEARN_DATA_DIR``) when one is set, else with
    ``datasets.load_dataset`` (which uses the local HF cache, and the network when allowed).

    Args:
        name: task name or path to a ``.jsonl``/``.json``/``.parquet`` MCQ file.
        data_dir: directory of offline copies: ``wmdp_bio_robust.jsonl``, ``wmdp_bio.jsonl``,
            ``mmlu_test.jsonl`` and ``mmlu_dev.jsonl`` (``.json``/``.parquet`` also read).
        num_fewshot: few-shot examples wanted (MMLU loads its dev split only when > 0).

    Raises:
        UserError: unknown task, or its data can be found neither in ``data_dir`` nor on the hub;
            the message says which files to provide and in which format.
    """
    if name in HUB_TASKS:
        data_dir = data_dir or os.environ.get(DATA_DIR_ENV) or None
        if data_dir is not None:
            if not Path(data_dir).is_dir():
                raise UserError(f"data dir {data_dir} (--data-dir or ${DATA_DIR_ENV}) is not a directory; give the "
                                f"folder holding the offline copies")
            return _FROM_DIR[name](Path(data_dir), num_fewshot)
        try:
            return _FROM_HUB[name](num_fewshot)
        except _Unreachable as e:
            raise UserError(f"task {name} is not reachable on the hub ({e}); run once with network to fill the "
                            f"HF cache, or pass --data-dir DIR (or set {DATA_DIR_ENV}) where DIR holds "
                            f"{_DATA_DIR_FILES[name]}") from e
    if Path(name).suffix.lower() in MCQ_SUFFIXES or Path(name).exists():
        return local_task(name)
    raise UserError(f"unknown task {name!r}; use {', '.join(HUB_TASKS)} or the path of an MCQ file "
                    f"({'/'.join(MCQ_SUFFIXES)} with fields question, choices, answer)")


# ---------------------------------------------------------------- lm-eval's prompt template


def description(subject: str | None, style: str = "letter") -> str:
    """The description line lm-eval prepends ("" when there is no subject)."""
    if not subject:
        return ""
    template = LETTER_DESCRIPTION if style == "letter" else CLOZE_DESCRIPTION
    return template.format(subject.replace("_", " "))


def doc_text(record: MCQRecord, style: str = "letter") -> str:
    """lm-eval's ``doc_to_text``: the question (and lettered choices) ending in ``Answer:``."""
    return prompt_text(record.question, record.choices, style)


def prompt_text(question: str, choices: Sequence[str], style: str = "letter") -> str:
    """The one prompt template (lm-eval's): ``letter`` — the question, ``A. ..`` lines, ``Answer:``;
    ``cloze`` — ``Question: ..\nAnswer:`` (the choices are the continuations)."""
    if style == "cloze":
        return f"Question: {question.strip()}\nAnswer:"
    lines = [question.strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    return "\n".join(lines) + "\nAnswer:"


def choice_labels(record: MCQRecord, style: str = "letter") -> list[str]:
    """lm-eval's ``doc_to_choice``: the letters (``letter``) or the choice texts (``cloze``)."""
    return list(LETTERS[: len(record.choices)]) if style == "letter" else list(record.choices)


def continuations(record: MCQRecord, style: str = "letter") -> list[str]:
    """The strings scored after the prompt: target delimiter + each choice label."""
    return [TARGET_DELIMITER + c for c in choice_labels(record, style)]


def fewshot_examples(subtask: MCQSubtask, record: MCQRecord, k: int) -> list[MCQRecord]:
    """The k examples lm-eval's ``first_n`` sampler picks for ``record``.

    From the dev split when the subtask has one (first k), else from the test split with every
    question equal to ``record`` removed first.

    Raises:
        UserError: fewer than k examples are available.
    """
    if k <= 0:
        return []
    pool = subtask.fewshot if subtask.fewshot is not None else [r for r in subtask.records if r != record]
    if subtask.fewshot is not None and not pool:
        raise UserError(f"subtask {subtask.name} has no dev examples loaded; load the task with num_fewshot={k} "
                        f"(its dev split is read only for k > 0)")
    if len(pool) < k:
        raise UserError(f"subtask {subtask.name} has only {len(pool)} few-shot examples; lower --num-fewshot to "
                        f"{len(pool)} or less")
    return pool[:k]


def build_prompt(record: MCQRecord, style: str = "letter", examples: Sequence[MCQRecord] = ()) -> str:
    """The full context lm-eval builds: description, k answered examples, then the question.

    Args:
        record: the question to ask.
        style: ``letter`` (lettered choices, answer letter) or ``cloze`` (answer text).
        examples: few-shot examples, in order (see :func:`fewshot_examples`).

    Returns:
        The prompt ending in ``Answer:`` (no trailing space; continuations start with " ").
    """
    check_style(style)
    shots = "".join(doc_text(ex, style) + TARGET_DELIMITER + choice_labels(ex, style)[ex.answer] + FEWSHOT_DELIMITER
                    for ex in examples)
    return description(record.subject, style) + shots + doc_text(record, style)
