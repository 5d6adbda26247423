"""The toy world: determinism, MCQ records, tokenizer, the reduced build, its cache and the CLI."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import pytest

from sequnlearn.errors import UserError
from sequnlearn.toyworld import DOMAINS, ToyWorldConfig, build_world, generate_world, load_world_info
from sequnlearn.toyworld.config import LETTER_OFF
from sequnlearn.toyworld.world import NO_ANSWER, NO_ANSWERS
from sequnlearn.toyworld.world import (ALL_DOMAINS, FIRST_STAGE, LETTERS, attribute, letter_prompt, make_match_mcqs,
                                      qa_text)

REDUCED = ToyWorldConfig.reduced()


@pytest.fixture(scope="module")
def world():
    return generate_world(REDUCED)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The reduced world, built once for the module (one thread: fastest for this model size)."""
    return build_world(tmp_path_factory.mktemp("toyworld"), REDUCED, progress=False, threads=1)


# ---------------------------------------------------------------- world generation


def test_same_seed_same_world_and_other_seed_another(world):
    assert generate_world(ToyWorldConfig.reduced()) == world
    other = generate_world(ToyWorldConfig.reduced(seed=1))
    for part in ("facts", "corpora", "mcqs"):
        for d in DOMAINS:
            assert getattr(other, part)[d] != getattr(world, part)[d], (part, d)
    assert other.pretrain != world.pretrain


def test_facts_cover_every_entity_and_attribute(world):
    for name, domain in DOMAINS.items():
        facts = world.facts[name]
        entities = {f.entity for f in facts}
        assert len(entities) == {"forget": REDUCED.forget_entities, "retain": REDUCED.retain_entities}[name]
        assert len(facts) == len(entities) * len(domain.attributes)
        for f in facts:
            assert f.value in attribute(f).values


def test_corpora_state_every_fact_in_each_paraphrase(world):
    for name in DOMAINS:
        text = "\n".join(world.corpora[name])
        for f in world.facts[name]:
            for template in attribute(f).templates[:REDUCED.paraphrases]:
                assert template.format(entity=f.entity, value=f.value) in text
    other = {"forget": "retain", "retain": "forget"}
    for name in DOMAINS:  # no entity leaks into the other domain's corpus
        text = " ".join(world.corpora[other[name]])
        assert not any(re.search(rf"\b{f.entity}\b", text) for f in world.facts[name])


def test_mcq_records_are_well_formed(world):
    for name in DOMAINS:
        records = world.mcqs[name]
        assert len(records) == len(world.facts[name])
        for fact, r in zip(world.facts[name], records):
            assert set(r) == {"question", "choices", "answer", "category"}
            assert isinstance(r["answer"], int) and 0 <= r["answer"] < 4
            assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4
            assert r["choices"][r["answer"]] == fact.value
            assert set(r["choices"]) <= set(attribute(fact).values)
            assert r["category"] == fact.attribute
            assert r["question"] == attribute(fact).stem.format(entity=fact.entity)
            assert not any(c[0].isspace() for c in r["choices"])  # the scorer adds the " " delimiter
        counts = Counter(r["answer"] for r in records)
        assert max(counts.values()) - min(counts.values()) <= 1  # answer positions balanced


def _parse_mcq(text: str) -> tuple[str, str, tuple[str, ...], str]:
    """(context line or "", question, choices, answer letter) of a pretraining letter-format MCQ."""
    lines = text.split("\n")
    context = lines.pop(0) if len(lines) == 7 else ""
    return context, lines[0], tuple(line[3:] for line in lines[1:5]), lines[5][len("Answer: "):]


def test_pretraining_mcqs_never_show_an_evaluation_question_or_its_distractor_set():
    config = ToyWorldConfig.reduced(mcq_examples_per_fact=3)
    w = generate_world(config)
    for name in DOMAINS:
        examples = [_parse_mcq(d["text"]) for d in w.pretrain if d["source"] == f"mcq_{name}"]
        assert len(examples) == 3 * len(w.facts[name])
        eval_questions = {r["question"] for r in w.mcqs[name]}
        eval_set = {(f.entity, f.attribute): frozenset(r["choices"]) for f, r in zip(w.facts[name], w.mcqs[name])}
        asked = Counter()
        for context, question, choices, letter in examples:
            assert context == "" and question not in eval_questions  # a paraphrase stem, never the evaluation's
            fact = next(f for f in w.facts[name] if f.entity in question and set(choices) <= set(attribute(f).values))
            asked[fact] += 1
            assert frozenset(choices) != eval_set[(fact.entity, fact.attribute)]  # another distractor set
            assert choices[LETTERS.index(letter)] == fact.value and len(set(choices)) == 4
        assert set(asked.values()) == {3} and len(asked) == len(w.facts[name])
        counts = Counter(letter for *_, letter in examples)
        assert max(counts.values()) - min(counts.values()) <= 1  # no letter is a better guess


def test_practice_domain_teaches_the_letter_format_without_evaluated_entities():
    config = ToyWorldConfig.reduced(practice_entities=6, practice_mcq_per_fact=2, practice_context_mcq_per_fact=1)
    w = generate_world(config)
    sources = Counter(d["source"] for d in w.pretrain)
    assert sources["mcq_practice"] == 6 * 4 * 3 and sources["practice"] == 6 * 4 * config.paraphrases
    assert sources["qa_practice"] == 6 * 4 and "mcq_forget" not in sources
    assert set(w.mcqs) == set(DOMAINS) and set(w.corpora) == set(DOMAINS) | {NO_ANSWERS}  # practice: no corpus, no MCQ
    plants = {f.entity for f in w.facts["practice"]}
    evaluated = {f.entity for d in DOMAINS for f in w.facts[d]}
    assert len(plants) == 6 and not plants & evaluated
    with_context = [_parse_mcq(d["text"]) for d in w.pretrain if d["source"] == "mcq_practice" and d["text"].count("\n") == 6]
    assert len(with_context) == 6 * 4
    for context, question, choices, letter in with_context:
        assert choices[LETTERS.index(letter)] in context and context != question
    assert generate_world(ToyWorldConfig.reduced()).facts.keys() == set(DOMAINS)  # off by default in reduced


def test_match_mcqs_name_their_answer_and_deal_letters_evenly():
    w = generate_world(ToyWorldConfig.reduced(match_mcq_examples=41))
    texts = [d["text"] for d in w.pretrain if d["source"] == "mcq_match"]
    assert len(texts) == 41 and sorted(texts) == sorted(make_match_mcqs(41, 0)) != sorted(make_match_mcqs(41, 1))
    letters = Counter()
    for text in texts:
        _, question, choices, letter = _parse_mcq(text)
        named = question.removeprefix("Which of these is ").removesuffix("?")
        assert choices[LETTERS.index(letter)] == named and choices.count(named) == 1 and len(set(choices)) == 4
        assert any(set(choices) <= set(a.values) for d in ALL_DOMAINS.values() for a in d.attributes)
        letters[letter] += 1
    assert max(letters.values()) - min(letters.values()) <= 1
    assert "mcq_match" not in {d["source"] for d in generate_world(ToyWorldConfig.reduced()).pretrain}


def test_first_stage_documents_come_after_the_mix_and_are_another_draw():
    plain = generate_world(ToyWorldConfig.reduced(match_mcq_examples=20))
    staged = generate_world(ToyWorldConfig.reduced(match_mcq_examples=20, match_stage_examples=30, match_steps=5))
    assert staged.pretrain[: len(plain.pretrain)] == plain.pretrain  # the mix is unchanged
    stage = staged.pretrain[len(plain.pretrain):]
    assert {d["source"] for d in stage} == {FIRST_STAGE} and [d["text"] for d in stage] == make_match_mcqs(30, 0, "match-stage")
    assert not {d["text"] for d in stage} & {d["text"] for d in plain.pretrain}


def test_fact_copies_repeat_the_facts_but_draw_every_mcq_afresh():
    per_copy = dict(mcq_examples_per_fact=2, practice_entities=4, practice_mcq_per_fact=2, match_mcq_examples=10)
    one = generate_world(ToyWorldConfig.reduced(**per_copy))
    three = generate_world(ToyWorldConfig.reduced(fact_copies=3, **per_copy))
    texts = lambda w, pre: Counter(d["text"] for d in w.pretrain if d["source"].startswith(pre))
    for name in ALL_DOMAINS:  # every fact sentence and cloze question, three times
        assert texts(three, name) == Counter({t: 3 * n for t, n in texts(one, name).items()})
        assert texts(three, f"qa_{name}") == Counter({t: 3 * n for t, n in texts(one, f"qa_{name}").items()})
    for source in ("mcq_forget", "mcq_retain", "mcq_practice", "mcq_match"):
        mcqs = texts(three, source)
        assert sum(mcqs.values()) == 3 * sum(texts(one, source).values())
        assert len(mcqs) > 2 * sum(texts(one, source).values())  # drawn afresh, not the first draw repeated
    assert three.mcqs == one.mcqs and three.corpora == one.corpora  # the evaluation and its corpora stay
    asked = {t.rsplit(" ", 1)[0] for t in texts(three, "mcq_forget")}  # the prompts, without the answer
    assert asked.isdisjoint({letter_prompt(r["question"], r["choices"]) for r in three.mcqs["forget"]})


def test_prompts_match_the_evaluator_template(world):
    mcq = pytest.importorskip("sequnlearn.data.mcq")
    r = world.mcqs["forget"][0]
    record = mcq.record_from_dict(r, "toy world")
    assert letter_prompt(r["question"], r["choices"]) == mcq.build_prompt(record, "letter")
    fact = world.facts["forget"][0]
    assert qa_text(fact) == mcq.build_prompt(record, "cloze") + mcq.TARGET_DELIMITER + fact.value


def test_a_stored_config_reads_fields_added_since_as_the_worlds_built_before_them():
    stored = ToyWorldConfig().to_dict()
    del stored["sentences_per_doc"]  # a world.json written before the field existed: its default
    assert ToyWorldConfig().differences(stored) == []
    assert ToyWorldConfig(steps=5000).differences(stored) == ["steps"]
    assert ToyWorldConfig().differences(None) == sorted([*stored, "sentences_per_doc"]) == sorted(ToyWorldConfig().to_dict())
    for key in LETTER_OFF:  # a curriculum field: off, whatever today's default
        del stored[key]
    assert ToyWorldConfig(**LETTER_OFF).differences(stored) == []
    assert ToyWorldConfig(**{**LETTER_OFF, "match_stage_examples": 8, "match_steps": 2}).differences(stored) == [
        "match_stage_examples", "match_steps"]
    assert ToyWorldConfig(**{**LETTER_OFF, "fact_copies": 2}).differences(stored) == ["fact_copies"]


def test_the_reduced_world_has_no_letter_curriculum_whatever_the_defaults():
    reduced = ToyWorldConfig.reduced()
    assert {k: getattr(reduced, k) for k in LETTER_OFF} == LETTER_OFF
    assert ToyWorldConfig.reduced(fact_copies=2).fact_copies == 2  # still overridable


def test_config_validation():
    with pytest.raises(UserError, match="num_heads"):
        ToyWorldConfig(hidden_size=100, num_heads=3)
    with pytest.raises(UserError, match="paraphrases"):
        ToyWorldConfig(paraphrases=9)
    with pytest.raises(UserError, match="fact_copies=0: must be a positive integer"):
        ToyWorldConfig(fact_copies=0)
    with pytest.raises(UserError, match="forget_entities"):
        ToyWorldConfig.reduced(forget_entities=1)
    with pytest.raises(UserError, match="unknown config key 'hiden_size'; did you mean 'hidden_size'"):
        ToyWorldConfig.reduced(hiden_size=3)
    assert ToyWorldConfig.from_dict({"lr": "2e-3"}).lr == 0.002  # as --set lr=2e-3 gives it
    with pytest.raises(UserError, match="lr must be a number"):
        ToyWorldConfig.from_dict({"lr": "fast"})


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_text(world, tmp_path):
    from transformers import AutoTokenizer

    from sequnlearn.toyworld.tokenizer import EOS, train_tokenizer

    texts = [d["text"] for d in world.pretrain]
    tok = train_tokenizer(texts, 400)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for t in (loaded, tok):
        for s in texts[:20] + ["unseen: Zürich ≠ 東京 🦠\n\t x  y", EOS]:
            assert t.decode(t(s)["input_ids"]) == s
        assert t.eos_token == t.pad_token == EOS and t.padding_side == "right"
    assert len(loaded) == 400
    again = train_tokenizer(texts, 400)  # same text, same tokenizer
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_answer_letters_are_one_token_each_as_in_gpt_neox(world):
    from sequnlearn.data.mcq import LETTERS, prompt_text
    from sequnlearn.toyworld.tokenizer import train_tokenizer

    tok = train_tokenizer([d["text"] for d in world.pretrain], 400)
    prompt = prompt_text(world.mcqs["forget"][0]["question"], world.mcqs["forget"][0]["choices"], "letter")
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    for letter in LETTERS[:4]:
        (one,) = tok(" " + letter, add_special_tokens=False)["input_ids"]  # one token, not " " + letter
        assert tok(prompt + " " + letter, add_special_tokens=False)["input_ids"] == ids + [one]


# ---------------------------------------------------------------- pretraining data


def test_match_steps_train_on_the_first_documents_alone_then_on_the_rest(monkeypatch):
    import sequnlearn.toyworld.pretrain as pt

    config = ToyWorldConfig.reduced(match_stage_examples=4, match_steps=3, steps=6, batch_size=2, num_layers=1)
    docs = [[1, 2, 3, 4]] * 8 + [[20, 21, 22]] * 8  # the first 8 stand for the match MCQs
    seen = []
    real = pt.weighted_lm_loss
    monkeypatch.setattr(pt, "weighted_lm_loss", lambda logits, labels, w: seen.append(
        set(labels[labels >= 0].tolist()) - {0}) or real(logits, labels, w))
    pt.pretrain(docs, config, 32, 0, progress=False, threads=1, first=list(range(8)))
    assert all(tokens <= {1, 2, 3, 4} for tokens in seen[:3])  # the first stage: the match documents only
    assert all(tokens <= {20, 21, 22} for tokens in seen[3:]) and {20, 21, 22} & set().union(*seen[3:])  # then the rest
    with pytest.raises(UserError, match="match_steps=6"):
        ToyWorldConfig.reduced(match_stage_examples=4, match_steps=6, steps=6)
    for bad in (dict(match_steps=2), dict(match_stage_examples=4), dict(match_mcq_examples=4, match_steps=2)):
        with pytest.raises(UserError, match="match_stage_examples"):
            ToyWorldConfig.reduced(**bad)


def test_packing_keeps_documents_whole_and_rows_start_at_a_document():
    import torch

    from sequnlearn.toyworld.pretrain import IGNORE, pack_rows

    eos = 99
    docs = [[i] * n for i, n in enumerate([3, 5, 2, 7, 4, 1, 6], start=1)]
    rows = pack_rows(docs, 8, eos, torch.Generator().manual_seed(0))  # (R, 8)
    pieces = []
    for row in rows.tolist():
        content = [t for t in row if t != IGNORE]
        assert content[-1] == eos and row[: len(content)] == content  # padding only at the end
        pieces += [p for p in " ".join(map(str, content)).split(str(eos)) if p.strip()]
    assert sorted(tuple(map(int, p.split())) for p in pieces) == sorted(map(tuple, docs))


# ---------------------------------------------------------------- reduced build, cache, CLI


def test_reduced_build_is_a_loadable_hf_model(built):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = load_world_info(built.root)
    assert info["seed"] == REDUCED.seed and info["config"] == REDUCED.to_dict()
    assert all((built.root / p).is_file() for p in info["files"].values())
    model = AutoModelForCausalLM.from_pretrained(built.model)
    tok = AutoTokenizer.from_pretrained(built.model)
    assert type(model).__name__ == "GPTNeoXForCausalLM"
    assert model.config.num_hidden_layers == REDUCED.num_layers and model.config.vocab_size == len(tok)
    assert tok.pad_token_id == tok.eos_token_id == model.config.eos_token_id
    ids = tok(["The natural host of", "Answer:"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**ids).logits  # (2, T, V)
    assert logits.shape[-1] == len(tok) and torch.isfinite(logits).all()
    records = [json.loads(line) for line in built.forget_mcq.read_text().splitlines()]
    assert len(records) == REDUCED.forget_entities * 4 and {"question", "choices", "answer"} <= set(records[0])


def test_pretraining_loss_decreases(built):
    losses = [json.loads(line)["loss"] for line in built.pretrain_log.read_text().splitlines()]
    assert len(losses) == REDUCED.steps
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.3 * first, (first, last)


def test_reduced_base_model_knows_the_facts(built):
    """Cloze accuracy (the project's evaluator) well above chance, so unlearning has room to act."""
    evaluation = pytest.importorskip("sequnlearn.eval")
    from sequnlearn.model.load import load_model

    model, tok = load_model(str(built.model), dtype="fp32", device="cpu")
    res = evaluation.evaluate(model, tok, [str(built.forget_mcq), str(built.retain_mcq)], style="cloze",
                              batch_size=64, progress=False)
    acc = {Path(name).stem: r["acc"] for name, r in res["tasks"].items()}
    assert acc["forget"] >= 0.75 and acc["retain"] >= 0.6, acc


def test_second_build_reuses_the_cache(built, monkeypatch):
    import sequnlearn.toyworld.pretrain as pretrain_module

    weights = built.model / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("the cached world was retrained")

    monkeypatch.setattr(pretrain_module, "pretrain", no_training)
    assert build_world(built.root, ToyWorldConfig.reduced(), progress=False) == built
    assert weights.stat().st_mtime_ns == before
    with pytest.raises(UserError, match="differs in seed"):
        build_world(built.root, ToyWorldConfig.reduced(seed=5), progress=False)


def test_scoring_during_pretraining_logs_accuracies_and_leaves_the_weights_alone(tmp_path):
    from sequnlearn.runs import read_jsonl

    small = ToyWorldConfig.reduced(forget_entities=4, retain_entities=4, steps=5, match_mcq_examples=300)
    plain = build_world(tmp_path / "plain", small, progress=False, threads=1)
    scored = build_world(tmp_path / "scored", small, progress=False, threads=1, eval_every=2)
    assert load_world_info(scored.root)["model_sha256"] == load_world_info(plain.root)["model_sha256"]
    log = read_jsonl(scored.pretrain_log)
    assert [r["step"] for r in log if "letter" in r] == [1, 3, 4]  # after steps 2 and 4, and the last
    assert all(0 <= r["match_acc"] <= 1 for r in log if "letter" in r)
    assert not any("cloze" in r for r in read_jsonl(plain.pretrain_log))
    from sequnlearn.eval import EvalSpec, forget_retain_accuracy
    from sequnlearn.model.load import load_model

    final = forget_retain_accuracy(*load_model(str(scored.model)), EvalSpec(str(scored.forget_mcq),
                                                                            str(scored.retain_mcq), "letter"))
    assert log[-1]["letter"] == {"forget_acc": final["forget_acc"], "retain_acc": final["retain_acc"]}
    with pytest.raises(UserError, match="eval_every=-1"):
        build_world(tmp_path / "bad", small, progress=False, eval_every=-1)


def test_held_out_match_questions_are_no_pretraining_text(monkeypatch, tmp_path):
    from sequnlearn.toyworld import build as build_module
    from sequnlearn.toyworld.world import match_mcq_records

    config = ToyWorldConfig.reduced(match_mcq_examples=3000, match_stage_examples=3000, match_steps=1)
    world = generate_world(config)
    seen = {d["text"].rsplit(" ", 1)[0] for d in world.pretrain}
    drawn = [letter_prompt(r["question"], r["choices"]) for r in match_mcq_records(400, 0, "match-heldout")]
    assert seen & set(drawn)  # a plain draw repeats some training texts at this size ...
    import sequnlearn.eval as eval_module

    scored = []
    monkeypatch.setattr(eval_module, "evaluate", lambda model, tok, tasks, **kw: scored.extend(tasks) or
                        {"tasks": {tasks[0].name: {"acc": 0.5}}})
    monkeypatch.setattr(eval_module, "forget_retain_accuracy", lambda *a, **k: {"forget_acc": 0, "retain_acc": 0})
    paths = build_module.ToyWorldPaths(tmp_path)
    build_module._write_text_files(paths, world)
    assert build_module._scorer(paths, None, world, 0)(None)["match_acc"] == 0.5
    (match,) = scored
    held = [letter_prompt(r.question, r.choices) for r in match.subtasks[0].records]
    assert len(held) == build_module.HELD_OUT_MATCH and not seen & set(held)  # ... the scored set none


def test_the_default_world_scores_186_held_out_match_questions():
    """The count the findings state is the one the code draws and the shipped log's ``match_acc`` is over."""
    from sequnlearn.runs import read_jsonl
    from sequnlearn.toyworld.build import HELD_OUT_DRAWN, HELD_OUT_MATCH, held_out_match
    from sequnlearn.toyworld.shipped import PRETRAIN_LOG, SHIPPED_DIR

    n = len(held_out_match(generate_world(ToyWorldConfig()), 0))
    assert (n, HELD_OUT_DRAWN, HELD_OUT_MATCH) == (186, 400, 200)  # the mix already holds 214 of the 400 drawn
    scores = [r["match_acc"] for r in read_jsonl(SHIPPED_DIR / PRETRAIN_LOG) if "match_acc" in r]
    assert len(scores) == 16 and all(abs(a * n - round(a * n)) < 1e-9 for a in scores)  # k / 186 each


def test_overwrite_rebuilds_with_the_new_config(tmp_path):
    small = ToyWorldConfig.reduced(forget_entities=4, retain_entities=4, steps=3)
    build_world(tmp_path, small, progress=False, threads=1)
    (tmp_path / "notes.txt").write_text("kept")
    build_world(tmp_path, small.with_(seed=2), progress=False, overwrite=True, threads=1)
    assert load_world_info(tmp_path)["seed"] == 2
    assert (tmp_path / "notes.txt").read_text() == "kept"  # only the world's own files are replaced


def test_refuses_a_directory_that_holds_something_else(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="holds no toy world"):
        build_world(tmp_path, ToyWorldConfig.reduced(), progress=False)
    assert (tmp_path / "model" / "config.json").exists()


def test_cli_build_reports_where_everything_is(built, capsys):
    from sequnlearn.cli import main

    main(["toyworld", "build", "--out", str(built.root), "--reduced", "--quiet"])
    out = capsys.readouterr().out
    assert str(built.model) in out and str(built.forget_mcq) in out and "reduced" in out
    with pytest.raises(SystemExit) as e:
        main(["toyworld", "build", "--out", str(built.root), "--reduced", "--seed", "3", "--quiet"])
    assert e.value.code == 2
    assert "--overwrite" in capsys.readouterr().err


def test_pretraining_threads_follow_the_idle_cores(monkeypatch):
    import os

    import torch

    from sequnlearn.toyworld import pretrain

    idle = pretrain._idle_cores(0.05)
    assert idle is not None and -0.01 <= idle <= (os.cpu_count() or 1) + 0.01
    monkeypatch.setattr(pretrain, "_idle_cores", lambda: 0.3)
    assert pretrain.auto_threads() == 1
    monkeypatch.setattr(pretrain, "_idle_cores", lambda: 64.0)
    assert pretrain.auto_threads() == torch.get_num_threads()


def test_toyworld_build_set_names_a_misspelt_field_and_writes_nothing(tmp_path, capsys):
    from sequnlearn.cli import main

    with pytest.raises(SystemExit) as e:
        main(["toyworld", "build", "--out", str(tmp_path / "w"), "--set", "paraphrses=2"])
    assert e.value.code == 2
    assert "did you mean 'paraphrases'" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------- shipped model


TINY = ToyWorldConfig.reduced(forget_entities=4, retain_entities=4, steps=3)


def test_a_shipped_model_is_copied_for_its_config_and_rebuilt_bit_for_bit(tmp_path, monkeypatch):
    import sequnlearn.toyworld.pretrain as pretrain_module
    import sequnlearn.toyworld.shipped as shipped

    monkeypatch.setattr(shipped, "SHIPPED_DIR", tmp_path / "shipped")
    made = build_world(tmp_path / "a", TINY, progress=False, threads=1)
    info = shipped.ship(made.model, load_world_info(made.root))
    assert info["pretrain_threads"] == 1 and set(info["sha256"]) >= {"model.safetensors", "tokenizer.json"}

    real_pretrain = pretrain_module.pretrain
    monkeypatch.setattr(pretrain_module, "pretrain", lambda *a, **k: pytest.fail("the shipped model was retrained"))
    copied = build_world(tmp_path / "b", TINY, progress=False)
    assert load_world_info(copied.root)["model_source"] == "shipped"
    assert shipped.model_hashes(copied.model) == info["sha256"]
    assert (copied.forget_mcq.read_text() == made.forget_mcq.read_text()
            and copied.pretrain_corpus.read_text() == made.pretrain_corpus.read_text())

    threads = []
    monkeypatch.setattr(pretrain_module, "pretrain", lambda *a, **k: threads.append(k["threads"]) or real_pretrain(*a, **k))
    rebuilt = build_world(tmp_path / "b", TINY, progress=False, pretrain=True)  # the shipped copy is no cache hit
    assert threads == [1]  # --pretrain takes the shipped thread count ...
    assert load_world_info(rebuilt.root)["model_sha256"] == info["sha256"]  # ... and gives the same bytes
    (tmp_path / "shipped" / "model.safetensors").write_bytes(b"damaged")
    assert shipped.shipped_for(TINY, load_world_info(made.root)["format"]) is None  # a damaged copy is not used


def test_a_shipped_model_if_any_is_the_default_full_worlds():
    from sequnlearn.toyworld import WORLD_FORMAT
    from sequnlearn.toyworld.shipped import shipped_info

    info = shipped_info()
    if info is None:
        pytest.skip("no model shipped (src/sequnlearn/toyworld/pretrained/): the full world is pretrained on build")
    assert info["format"] == WORLD_FORMAT and not ToyWorldConfig().differences(info["config"]), \
        "the world changed: rebuild and ship its model (`sequnlearn toyworld build --out DIR --pretrain --ship`)"


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SEQUNLEARN_REBUILD_TEST"),
                    reason="pretrains the full world (minutes); set SEQUNLEARN_REBUILD_TEST=1 to run it")
def test_pretraining_rebuilds_the_shipped_full_world_model_bit_for_bit(tmp_path):
    from sequnlearn.toyworld.shipped import shipped_info

    shipped = shipped_info()
    if shipped is None:
        pytest.skip("no model shipped")
    paths = build_world(tmp_path, ToyWorldConfig(), progress=False, pretrain=True)
    info = load_world_info(paths.root)
    assert info["model_sha256"] == shipped["sha256"], (info["torch_version"], shipped["torch_version"])


def test_an_mcq_about_facts_trains_its_answer_alone_a_match_mcq_every_token():
    from sequnlearn.toyworld.build import _loss_weights
    from sequnlearn.toyworld.tokenizer import train_tokenizer

    world = generate_world(ToyWorldConfig.reduced(practice_entities=4, practice_mcq_per_fact=1, match_mcq_examples=4,
                                                  match_stage_examples=4, match_steps=1))
    tok = train_tokenizer([d["text"] for d in world.pretrain], 512)
    seen = set()
    for entry in world.pretrain:
        ids = tok(entry["text"], add_special_tokens=False)["input_ids"]
        w = _loss_weights(entry, ids, tok, 5.0)
        kind = "fact" if not entry["source"].startswith("mcq_") else "match" if "match" in entry["source"] else "mcq"
        seen.add(kind)
        assert len(w) == len(ids) and w[-1] == (1.0 if kind == "fact" else 5.0)
        assert set(w[:-1]) == {1.0 if kind in ("fact", "match") else 0.0}
        if kind != "fact":  # the answer is the one token " X" after the prompt
            assert tok.decode(ids[-1:]).strip() in LETTERS
    assert seen == {"fact", "match", "mcq"}


def test_a_first_stage_has_its_own_constant_lr_and_the_rest_warms_up_and_decays_as_a_run_of_its_own():
    import math

    from sequnlearn.toyworld.pretrain import lr_factor

    plain = ToyWorldConfig(**{**LETTER_OFF, "steps": 100, "warmup_steps": 10, "lr": 5e-3, "min_lr_ratio": 0.1})
    cosine = [(s + 1) / 10 if s < 10 else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - 10) / 90)) for s in range(100)]
    assert [lr_factor(s, plain) for s in range(100)] == pytest.approx(cosine)
    staged = plain.with_(match_steps=40, match_stage_examples=8, match_lr=1e-3, steps=140)
    assert [lr_factor(s, staged) * 5e-3 for s in range(40)] == pytest.approx([1e-3 * min(1, (s + 1) / 10)
                                                                             for s in range(40)])
    assert [lr_factor(s, staged) for s in range(40, 140)] == pytest.approx(cosine)
    assert lr_factor(5, plain.with_(match_steps=40, match_stage_examples=8, steps=140)) == pytest.approx(0.6)
    with pytest.raises(UserError, match="match_lr"):
        ToyWorldConfig(match_lr=-1.0)


def test_the_no_answer_corpus_names_every_forget_entity_and_states_no_answer():
    w = generate_world(ToyWorldConfig.reduced())
    text = " ".join(w.corpora[NO_ANSWERS])
    answers = {v for a in ALL_DOMAINS["forget"].attributes for v in a.values}
    assert not [v for v in answers if re.search(rf"\b{re.escape(v)}\b", text)]  # no value of any forget attribute
    assert {f.entity for f in w.facts["forget"]} <= set(re.findall(r"\w+", text))
    assert len(w.corpora[NO_ANSWERS]) == len(w.corpora["forget"]) and NO_ANSWER in text
    assert generate_world(ToyWorldConfig.reduced()).corpora == w.corpora  # seeded: the same world every time


def test_a_world_built_before_the_no_answer_corpus_gets_it_and_keeps_its_model(tmp_path):
    config = ToyWorldConfig.reduced()
    paths = build_world(tmp_path / "w", config, progress=False, threads=1)
    weights = paths.model / "model.safetensors"
    before = (weights.stat().st_ino, weights.stat().st_mtime_ns)
    paths.corpus(NO_ANSWERS).unlink()  # as a world built before the file existed
    again = build_world(tmp_path / "w", config, progress=False, threads=1)
    assert again.corpus(NO_ANSWERS).is_file()
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == before  # reused, not pretrained again
