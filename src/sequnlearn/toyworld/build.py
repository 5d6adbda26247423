"""Build a toy world on disk (text, MCQs, tokenizer, pretrained base model), cached by config.

Layout of ``out_dir`` (see :class:`ToyWorldPaths`)::

    world.json            format version, seed, config, file list, build time, final loss, where the model
                          came from (shipped copy or pretrained here) and its files' SHA-256 (written last)
    facts.json            entities and their attribute values per domain, and each attribute's value set
    corpus/forget.jsonl   forget-domain documents, {"text": ...} per line
    corpus/retain.jsonl   retain-domain documents
    corpus/forget_no_answers.jsonl  the forget documents with every answer replaced (the attack's no-answer control)
    corpus/forget_keywords.txt  the forget domain's (hazardous) entity names, one a line: a keyword list
                          for ``forget_keywords`` (the forget loss on the tokens of those names only)
    corpus/pretrain.jsonl the shuffled pretraining mix, {"text": ..., "source": ...} per line: single fact
                          sentences, answered "Question:/Answer:" texts, letter-format MCQs if set
    mcq/forget.jsonl      evaluation MCQs {"question", "choices", "answer", "category"}
    mcq/retain.jsonl
    pretrain_log.jsonl    one line per pretraining step: step, loss, lr, elapsed_s
    model/                HF GPT-NeoX model (config.json, model.safetensors) and tokenizer files

The full world's model is shipped in the package (:mod:`sequnlearn.toyworld.shipped`): a build
with the shipped config writes the text files and copies it, in seconds; ``pretrain=True``
(``--pretrain``) trains it instead, bit for bit the same on the same torch version and CPU kind.

Caching: ``world.json`` is written only after everything else, so its presence marks a finished
build. A second call with an equal config returns at once; a world of the same config in an older
world format (built by older code) is rebuilt. A different config in the same directory is an error
unless ``overwrite=True``, which deletes the files listed above (and nothing else in the directory)
and rebuilds. A directory without ``world.json`` is built
into only when it is empty or holds nothing but the remains of an interrupted build.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sequnlearn.errors import UserError
from sequnlearn.runs import atomic_dir, atomic_write_text, read_json, write_json, write_jsonl
from sequnlearn.toyworld.config import ToyWorldConfig
from sequnlearn.toyworld.shipped import PRETRAIN_LOG, copy_shipped, model_hashes, shipped_for, shipped_info
from sequnlearn.toyworld.world import ALL_DOMAINS, DOMAINS, FIRST_STAGE, MATCH, NO_ANSWERS, World, generate_world

WORLD_FORMAT = 3
"""Version of the on-disk world; bump it when generation changes so old caches are not reused
(3: answer letters are one token each)."""


@dataclass(frozen=True)
class ToyWorldPaths:
    """Paths of a built toy world under ``root``."""

    root: Path

    @property
    def world_json(self) -> Path:
        return self.root / "world.json"

    @property
    def facts(self) -> Path:
        return self.root / "facts.json"

    @property
    def model(self) -> Path:
        """HF model directory; it also holds the tokenizer."""
        return self.root / "model"

    @property
    def tokenizer(self) -> Path:
        """Same directory as :attr:`model`."""
        return self.model

    @property
    def pretrain_corpus(self) -> Path:
        return self.root / "corpus" / "pretrain.jsonl"

    @property
    def pretrain_log(self) -> Path:
        return self.root / "pretrain_log.jsonl"

    @property
    def forget_corpus(self) -> Path:
        return self.corpus("forget")

    @property
    def retain_corpus(self) -> Path:
        return self.corpus("retain")

    @property
    def forget_mcq(self) -> Path:
        return self.mcq("forget")

    @property
    def forget_keywords(self) -> Path:
        """The forget domain's entity names, one a line (:func:`hazard_keywords`)."""
        return self.root / "corpus" / "forget_keywords.txt"

    @property
    def retain_mcq(self) -> Path:
        return self.mcq("retain")

    def corpus(self, domain: str) -> Path:
        """Document file of ``domain`` (``forget`` or ``retain``)."""
        return self.root / "corpus" / f"{domain}.jsonl"

    def mcq(self, domain: str) -> Path:
        """MCQ file of ``domain`` (``forget`` or ``retain``)."""
        return self.root / "mcq" / f"{domain}.jsonl"

    def files(self) -> dict[str, str]:
        """Name → path relative to ``root`` of every artifact (model files included)."""
        named = {"facts": self.facts, "pretrain_corpus": self.pretrain_corpus, "pretrain_log": self.pretrain_log,
                 "model_config": self.model / "config.json", "model_weights": self.model / "model.safetensors",
                 "tokenizer": self.model / "tokenizer.json", "tokenizer_config": self.model / "tokenizer_config.json"}
        for d in DOMAINS:
            named[f"{d}_corpus"], named[f"{d}_mcq"] = self.corpus(d), self.mcq(d)
        named.update(self.derived())
        return {k: str(p.relative_to(self.root)) for k, p in named.items()}

    def derived(self) -> dict[str, Path]:
        """The text files generated from the config alone that a world built by older code may lack
        (:func:`_add_derived_files` adds them in place)."""
        return {f"{NO_ANSWERS}_corpus": self.corpus(NO_ANSWERS), "forget_keywords": self.forget_keywords}

    def is_complete(self) -> bool:
        """True when ``world.json`` and every artifact it implies exist."""
        return self.world_json.is_file() and all((self.root / p).is_file() for p in self.files().values())


def build_world(out_dir: str | os.PathLike, config: ToyWorldConfig | None = None, *, progress: bool = True,
                overwrite: bool = False, threads: int | None = None, pretrain: bool = False,
                eval_every: int = 0) -> ToyWorldPaths:
    """Build the toy world into ``out_dir``, or reuse the one already built there with this config.

    Args:
        out_dir: directory to build into (created if missing).
        config: the world's config; ``ToyWorldConfig()`` (the full world) when omitted.
        progress: print stage lines and a pretraining progress bar to stderr.
        overwrite: replace a world built with a different config instead of raising.
        threads: torch CPU threads for pretraining; ``None``: the shipped model's thread count when
            ``config`` is the shipped one (so a rebuild gives the same bytes), else torch's setting
            lowered to the idle cores. Not part of the config: it changes the float summation
            order, so the weights (not the text) of the world.
        pretrain: pretrain the model even when the package ships one for ``config`` (see
            :mod:`sequnlearn.toyworld.shipped`); a cached world that holds the shipped copy is rebuilt.
        eval_every: while pretraining, score the world's forget and retain MCQs in cloze and letter
            format, and the :func:`held_out_match` MCQs (``match_acc``), every this many steps into
            ``pretrain_log.jsonl`` (0: never); the weights are the same either way.

    Returns:
        The :class:`ToyWorldPaths` of the finished world.

    Raises:
        UserError: ``out_dir`` is a file; it holds a world built with another config and
            ``overwrite`` is false; or it holds files that are not a toy
            world's (nothing there is ever deleted unless it is the world's own).
    """
    config = config if config is not None else ToyWorldConfig()
    paths = ToyWorldPaths(Path(out_dir))
    if paths.root.exists() and not paths.root.is_dir():
        raise UserError(f"toy world out dir {paths.root} is a file; give a directory path")
    _add_derived_files(paths, config)
    if _cached(paths, config, overwrite, pretrain):
        _say(progress, f"toy world: reusing {paths.root} (built earlier with the same config)")
        return paths
    if threads is not None and threads < 1:
        raise UserError(f"threads={threads}: give a positive number of CPU threads, or leave it unset")
    if eval_every < 0:
        raise UserError(f"eval_every={eval_every}: score every this many pretraining steps (a positive number), or 0 for never")
    _check_not_foreign(paths)
    _clear(paths)
    start = time.perf_counter()
    world = generate_world(config)
    _write_text_files(paths, world)
    shipped = None if pretrain else shipped_for(config, WORLD_FORMAT)
    if shipped is not None:
        _say(progress, "toy world: using the shipped pretrained model (`--pretrain` trains it instead)")
        model_info = _copy_shipped_model(paths, shipped)
    else:
        if threads is None and shipped_for(config, WORLD_FORMAT) is not None:
            threads = shipped_info()["pretrain_threads"]
        model_info = _build_model(paths, world, config, progress, threads, eval_every)
    write_json(paths.world_json, {
        "format": WORLD_FORMAT, "seed": config.seed, "config": config.to_dict(), "files": paths.files(), **model_info,
        "build_seconds": round(time.perf_counter() - start, 1),
        "domains": {name: {"kind": d.kind, "attributes": [a.name for a in d.attributes]} for name, d in DOMAINS.items()},
    })
    _say(progress, f"toy world: built {paths.root} in {time.perf_counter() - start:.0f}s")
    return paths


def load_world_info(out_dir: str | os.PathLike) -> dict:
    """Read ``world.json`` of a built toy world.

    Raises:
        UserError: ``out_dir`` holds no finished toy world.
    """
    paths = ToyWorldPaths(Path(out_dir))
    if not paths.is_complete():
        raise UserError(f"{paths.root} holds no finished toy world; build one with `sequnlearn toyworld build --out {paths.root}`")
    return read_json(paths.world_json)


def _cached(paths: ToyWorldPaths, config: ToyWorldConfig, overwrite: bool, pretrain: bool = False) -> bool:
    """True when a finished world with this config is there (pretrained here, if ``pretrain``); raise on a
    conflicting one."""
    if not paths.world_json.is_file():
        return False
    try:
        info = read_json(paths.world_json)
    except (OSError, json.JSONDecodeError, UserError):
        return False  # unreadable: treat as an unfinished build
    diff = config.differences(info.get("config"))
    if not diff and info.get("format") == WORLD_FORMAT and paths.is_complete():
        return not (pretrain and info.get("model_source") == "shipped")
    if diff and not overwrite:  # the user's world with another config: not ours to replace
        raise UserError(f"{paths.root} holds a toy world built with a different config (differs in "
                        f"{', '.join(diff)}); pick another --out, or pass --overwrite (overwrite=True) to rebuild it")
    return False  # same config, older world format (a cache of older code) or unfinished: rebuilt


def _add_derived_files(paths: ToyWorldPaths, config: ToyWorldConfig) -> None:
    """Write the derived text files (:meth:`ToyWorldPaths.derived`: the no-answer corpus, the forget keyword
    list) missing from a finished world of this config built before they existed (text generated from the
    config; the model and every other file stay as they are)."""
    derived = paths.derived()
    missing = [k for k, p in derived.items() if not p.exists()]
    if not missing or not paths.world_json.is_file():
        return
    try:
        info = read_json(paths.world_json)
    except (OSError, json.JSONDecodeError, UserError):
        return
    others = [p for k, p in paths.files().items() if k not in derived]
    if (not config.differences(info.get("config")) and info.get("format") == WORLD_FORMAT
            and all((paths.root / p).is_file() for p in others)):
        _write_derived(paths, generate_world(config), missing)


def _write_derived(paths: ToyWorldPaths, world: World, names) -> None:
    """Write the derived files ``names`` (keys of :meth:`ToyWorldPaths.derived`) of ``world``, each atomically."""
    if f"{NO_ANSWERS}_corpus" in names:
        write_jsonl(paths.corpus(NO_ANSWERS), [{"text": t} for t in world.corpora[NO_ANSWERS]])
    if "forget_keywords" in names:
        atomic_write_text(paths.forget_keywords, "".join(f"{name}\n" for name in hazard_keywords(world)))


def hazard_keywords(world: World) -> list[str]:
    """The forget domain's entity names (the pathogens: the toy world's hazardous names), in fact order."""
    return list(dict.fromkeys(f.entity for f in world.facts["forget"]))


_OWN_NAMES = {"world.json", "facts.json", "pretrain_log.jsonl", "corpus", "mcq", "model"}


def _check_not_foreign(paths: ToyWorldPaths) -> None:
    """Refuse a directory that has no ``world.json`` and holds anything but an interrupted build.

    Raises:
        UserError: other files are there, or a ``model/`` without the ``facts.json`` a build writes first.
    """
    if paths.world_json.exists() or not paths.root.is_dir():
        return
    names = {p.name for p in paths.root.iterdir() if not p.name.startswith(".model.")}
    foreign = sorted(names - _OWN_NAMES)
    if foreign or ("model" in names and "facts.json" not in names):
        what = ", ".join(foreign) if foreign else "model/"
        raise UserError(f"{paths.root} is not empty and holds no toy world ({what}); build into an empty or new directory")


def _clear(paths: ToyWorldPaths) -> None:
    """Delete the artifacts of an earlier or unfinished build (and only those)."""
    if paths.world_json.exists():
        paths.world_json.unlink()
    for p in (paths.model, paths.root / "corpus", paths.root / "mcq"):
        if p.is_dir():
            shutil.rmtree(p)
    for p in (paths.facts, paths.pretrain_log):
        if p.exists():
            p.unlink()
    for p in paths.root.glob(".model.*.tmp"):  # left by a build killed while saving
        shutil.rmtree(p, ignore_errors=True)


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _write_text_files(paths: ToyWorldPaths, world: World) -> None:
    """Write facts, corpora, the pretraining mix and the MCQ sets (each file atomically)."""
    facts = {}
    for name in world.facts:  # forget, retain, and the pretraining-only practice domain if any
        domain = ALL_DOMAINS[name]
        entities: dict[str, dict[str, str]] = {}
        for f in world.facts[name]:
            entities.setdefault(f.entity, {})[f.attribute] = f.value
        facts[name] = {"kind": domain.kind, "entities": entities,
                       "value_sets": {a.name: list(a.values) for a in domain.attributes},
                       "question_stems": {a.name: a.stem for a in domain.attributes}}
    for name in DOMAINS:
        write_jsonl(paths.corpus(name), [{"text": t} for t in world.corpora[name]])
        write_jsonl(paths.mcq(name), world.mcqs[name])
    _write_derived(paths, world, paths.derived())
    write_json(paths.facts, facts)
    write_jsonl(paths.pretrain_corpus, world.pretrain)


def _copy_shipped_model(paths: ToyWorldPaths, shipped: dict) -> dict:
    """Copy the shipped model into ``model/`` (via a temp dir + rename); its ``world.json`` facts."""
    with atomic_dir(paths.model) as tmp:
        copy_shipped(tmp)
        os.replace(tmp / PRETRAIN_LOG, paths.pretrain_log)
    keep = ("vocab_size", "model_parameters", "final_pretrain_loss", "pretrain_threads", "pretrain_seconds",
            "torch_version")
    return {"model_source": "shipped", **{k: shipped[k] for k in keep if k in shipped},
            "model_sha256": shipped["sha256"]}


def _build_model(paths: ToyWorldPaths, world: World, config: ToyWorldConfig, progress: bool,
                 threads: int | None, eval_every: int = 0) -> dict:
    """Train the tokenizer, pretrain the model, save both into ``model/`` (via a temp dir + rename).

    Returns:
        ``vocab_size``, ``model_parameters``, ``final_pretrain_loss`` (mean of the last 10 steps),
        ``pretrain_threads`` and ``pretrain_seconds``.
    """
    import torch

    from sequnlearn.toyworld.pretrain import auto_threads, pretrain
    from sequnlearn.toyworld.tokenizer import train_tokenizer

    texts = [d["text"] for d in world.pretrain]
    _say(progress, f"toy world: training a {config.vocab_size}-token BPE tokenizer on {len(texts)} documents")
    tok = train_tokenizer(texts, config.vocab_size)
    docs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    weights = [_loss_weights(d, doc, tok, config.mcq_answer_weight) for d, doc in zip(world.pretrain, docs)]
    threads = threads or auto_threads()
    _say(progress, f"toy world: pretraining a {config.num_layers}x{config.hidden_size} GPT-NeoX for {config.steps} "
                   f"steps on {threads} CPU thread(s)")
    model, log = pretrain(docs, config, len(tok), tok.eos_token_id, progress=progress, threads=threads,
                          weights=weights, eval_every=eval_every,
                          on_eval=_scorer(paths, tok, world, config.seed) if eval_every else None,
                          first=[i for i, d in enumerate(world.pretrain) if d["source"] == FIRST_STAGE])
    write_jsonl(paths.pretrain_log, log)
    _save_model(paths, model, tok)
    tail = [r["loss"] for r in log[-10:]]
    return {"model_source": "pretrained", "vocab_size": len(tok),
            "model_parameters": sum(p.numel() for p in model.parameters()),
            "final_pretrain_loss": sum(tail) / len(tail), "pretrain_threads": threads,
            "pretrain_seconds": log[-1]["elapsed_s"], "torch_version": torch.__version__,
            "model_sha256": model_hashes(paths.model)}


HELD_OUT_MATCH = 200
"""At most this many held-out match MCQs are scored during pretraining (``eval_every``): see
:func:`held_out_match`. A cap, not a count: the default world has only 186."""

HELD_OUT_DRAWN = 2 * HELD_OUT_MATCH
"""Match MCQs drawn (stream ``match-heldout``) to find the held-out ones among."""


def held_out_match(world: World, seed: int) -> list[dict]:
    """The match MCQ records scored as ``match_acc`` during pretraining: those of the
    :data:`HELD_OUT_DRAWN` drawn whose question no pretraining text holds, the first
    :data:`HELD_OUT_MATCH` of them at most.

    How many qualify depends on the world: the default world's 60,000 pretraining match texts hold
    214 of the 400 drawn, so it scores 186 (the shipped ``pretrain_log.jsonl``'s ``match_acc`` is a
    count out of 186); a world with fewer match texts reaches the cap of 200.
    """
    from sequnlearn.toyworld.world import letter_prompt, match_mcq_records

    seen = {d["text"].rsplit(" ", 1)[0] for d in world.pretrain}
    return [r for r in match_mcq_records(HELD_OUT_DRAWN, seed, "match-heldout")
            if letter_prompt(r["question"], r["choices"]) not in seen][:HELD_OUT_MATCH]


def _scorer(paths: ToyWorldPaths, tok, world: World, seed: int):
    """``model -> {cloze: {forget_acc, retain_acc}, letter: {...}, match_acc}`` on the world's MCQs (read
    once) and on the :func:`held_out_match` MCQs (letter format)."""
    from dataclasses import replace

    from sequnlearn.data.mcq import MCQSubtask, MCQTask, record_from_dict
    from sequnlearn.eval import EvalSpec, evaluate, forget_retain_accuracy, with_loaded_tasks

    spec = with_loaded_tasks(EvalSpec(str(paths.forget_mcq), str(paths.retain_mcq)))
    held = held_out_match(world, seed)
    match = MCQTask("match (held out)", [MCQSubtask("match", [record_from_dict(r, "match") for r in held])],
                    "generated")

    def score(model) -> dict:
        out = {}
        for style in ("cloze", "letter"):
            res = forget_retain_accuracy(model, tok, replace(spec, style=style))
            out[style] = {"forget_acc": res["forget_acc"], "retain_acc": res["retain_acc"]}
        out["match_acc"] = evaluate(model, tok, [match], style="letter", progress=False)["tasks"][match.name]["acc"]
        return out
    return score


def _loss_weights(entry: dict, ids: list[int], tok, answer_weight: float) -> list[float]:
    """Per-token pretraining loss weights: 1, and ``answer_weight`` on a letter-format MCQ's answer.

    In an MCQ about facts (``mcq_<domain>``) only the answer letter is trained: its question and
    choices get 0, since three of the four choices are false statements about the entity and would
    teach the wrong values. A match MCQ (``mcq_match``, first stage included) states no fact, so
    its question and choices are trained as any text: predicting the choices teaches the model to
    read the question's value from the choice lines, a step of the answer it has to learn.
    """
    if not entry["source"].startswith("mcq_"):
        return [1.0] * len(ids)
    text = entry["text"]
    prompt = tok(text[: text.rindex(" ")], add_special_tokens=False)["input_ids"]
    if ids[: len(prompt)] != prompt:
        raise ValueError(f"the answer of a pretraining MCQ does not tokenize apart from its prompt: {text!r}")
    trained = 1.0 if entry["source"] in (MATCH, FIRST_STAGE) else 0.0
    return [trained] * len(prompt) + [answer_weight] * (len(ids) - len(prompt))


def _save_model(paths: ToyWorldPaths, model, tokenizer) -> None:
    """Save model and tokenizer into a temp directory, then rename it to ``model/`` (atomic)."""
    with atomic_dir(paths.model) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
