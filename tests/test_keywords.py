"""Keyword token masks for the forget loss (``forget_keywords``): reading lists, matching, offsets, the cache,
the engine's masked forget loss, and the toy world's own keyword list."""

from __future__ import annotations

import json
import re

import pytest
import torch

from sequnlearn.config import load_config
from sequnlearn.data import keywords as kw
from sequnlearn.data.corpora import CorpusSpec, collate, load_texts, tokenize
from sequnlearn.errors import UserError
from sequnlearn.model.tiny import byte_tokenizer


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Every test caches its masks under its own directory, never in the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "sequnlearn" / "keyword_masks"


def bpe_with_bos():
    """A byte-level BPE that splits ``Varkovirus`` as ``Var|ko|virus`` and puts ``<s>`` (offsets (0, 0)) first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("V", "a"), ("Va", "r"), ("k", "o"), ("v", "i"), ("vi", "r"), ("u", "s"), ("vir", "us")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<s>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<s>")


def masks(texts, words, tok=None, max_length=64):
    tok = tok or byte_tokenizer()
    return kw.compute_masks(texts, tokenize(texts, tok, max_length), tok, max_length, words)


# ---------------------------------------------------------------- reading lists


def test_a_txt_list_has_one_keyword_a_line_and_a_csv_its_keyword_or_term_or_first_column(tmp_path):
    txt = tmp_path / "k.txt"
    txt.write_text("  Varkovirus \n\n kelR\r\nvapQ", encoding="utf-8")
    assert kw.read_keywords(txt) == ["Varkovirus", "kelR", "vapQ"]
    named = tmp_path / "named.csv"
    named.write_text('id,Keyword,note\n1,Varkovirus,x\n2,"bats, ticks",y\n3,,z\n', encoding="utf-8")
    assert kw.read_keywords(named) == ["Varkovirus", "bats, ticks"]
    term = tmp_path / "term.csv"
    term.write_text("id,term\n1,kelR\n", encoding="utf-8")
    assert kw.read_keywords(term) == ["kelR"]
    first = tmp_path / "first.csv"
    first.write_text("name,score\nkelR,3\nvapQ,1\n", encoding="utf-8")
    assert kw.read_keywords(first) == ["kelR", "vapQ"]


@pytest.mark.parametrize("name, text, message", [
    ("k.json", '["a"]', "not a .txt or .csv"), ("empty.txt", "\n \n", "holds no keyword"),
    ("header.csv", "keyword\n", "no row below its header"), ("gone.txt", None, "does not exist")])
def test_a_bad_list_is_one_line(tmp_path, name, text, message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=message):
        kw.read_keywords(path)


def test_the_config_key_takes_a_txt_or_csv_path_or_null():
    assert load_config(preset="tiny").forget_keywords is None
    assert load_config(preset="tiny", overrides=["forget_keywords=k.CSV"]).forget_keywords == "k.CSV"
    with pytest.raises(UserError, match="forget_keywords 'k.json' is not a .txt or .csv"):
        load_config(preset="tiny", overrides=["forget_keywords=k.json"])


# ---------------------------------------------------------------- matching and offsets


def test_positions_by_hand_with_a_byte_tokenizer():
    # byte tokens: token i is character i.   0123456789012345678901
    assert masks(["The Varkovirus spreads", "no match here", "xVIRUSx virus"], ["varkovirus", "virus"]) == [
        list(range(4, 14)),  # "Varkovirus" (chars 4..13) matched whole by the longer keyword
        [],
        [1, 2, 3, 4, 5, 8, 9, 10, 11, 12]]  # any case, inside a word too


def test_a_token_counts_when_its_span_overlaps_a_match_and_special_tokens_shift_nothing():
    tok = bpe_with_bos()
    # tokens: <s> (0, 0) | Var (0, 3) | ko (3, 5) | virus (5, 10) | Ġ | s | ...
    assert tok.convert_ids_to_tokens(tokenize(["Varkovirus s"], tok, 64)[0])[:4] == ["<s>", "Var", "ko", "virus"]
    assert masks(["Varkovirus s"], ["kovi"], tok) == [[2, 3]]  # "kovi" (3..7) overlaps ko and virus, not Var
    assert masks(["Varkovirus s"], ["var"], tok) == [[1]]  # <s> (an empty span at 0) never counts
    assert masks(["Varkovirus s"], ["S"], tok) == [[3, 5]]  # the "s" ending "virus" (9) and the last one (11)


def test_the_longest_keyword_wins_at_a_position_and_matches_do_not_overlap():
    # "Varko" listed first must not cut "Varkovirus" short: the whole name is masked.
    assert masks(["Varkovirus!"], ["Varko", "Varkovirus"]) == [list(range(10))]
    assert masks(["Varkovirus!"], ["Varkovirus", "Varko"]) == [list(range(10))]
    # left to right, non-overlapping: "ab" at 0 takes the "b" that "bcd" would need; "cd" alone is no keyword
    assert masks(["abcd"], ["ab", "bcd"]) == [[0, 1]]
    assert kw.match_spans("ABcab", kw.keyword_pattern(["ab"])) == [(0, 2), (3, 5)]


def test_matching_ignores_case_on_the_original_characters():
    # "İ" lowercases to two characters: matching on a lowered copy would shift every offset after it.
    assert masks(["İ virus", "VIRUS", "ViRuS"], ["Virus"]) == [[3, 4, 5, 6, 7], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]


def test_masks_follow_the_truncation_of_the_ids():
    tok = byte_tokenizer()
    assert masks(["abc virus", "abcdefgh virus"], ["virus"], tok, max_length=6) == [[4, 5], []]
    assert masks(["abc virus"], ["virus"], bpe_with_bos(), max_length=6) == [[5]]  # <s> a b c Ġ v


def test_a_slow_tokenizer_is_refused():
    class Slow:
        is_fast = False

    with pytest.raises(UserError, match="needs a fast tokenizer"):
        kw.compute_masks(["a"], [[0]], Slow(), 8, ["a"])


# ---------------------------------------------------------------- counts, errors and the cache


def _list(tmp_path, *words, name="k.txt"):
    path = tmp_path / name
    path.write_text("".join(w + "\n" for w in words), encoding="utf-8")
    return path


def test_rows_without_a_match_are_counted(tmp_path):
    tok = byte_tokenizer()
    texts = ["a virus", "nothing", "virus virus", "none"]
    got = kw.keyword_masks(_list(tmp_path, "virus"), texts, tokenize(texts, tok, 64), tok, 64)
    assert got.positions == [[2, 3, 4, 5, 6], [], list(range(5)) + list(range(6, 11)), []]
    assert (got.masked, got.tokens, got.unmatched) == (15, 7 + 7 + 11 + 4, 2)
    assert got.share == pytest.approx(15 / 29)
    line = kw.masks_line("k.txt", got)
    assert "15 of 29 tokens (51.7%)" in line and "2 of 4 forget examples have no match" in line


def test_a_list_that_matches_nothing_is_an_error_and_caches_nothing(tmp_path, own_cache):
    tok = byte_tokenizer()
    texts = ["a virus", "nothing"]
    with pytest.raises(UserError, match=r"k.txt \(2 keywords\) matches no token of the 2 forget examples"):
        kw.keyword_masks(_list(tmp_path, "plasmid", "toxin"), texts, tokenize(texts, tok, 64), tok, 64)
    assert not own_cache.exists()


def test_a_cache_hit_gives_what_a_miss_computed(tmp_path, own_cache, monkeypatch):
    tok = bpe_with_bos()
    texts = ["Varkovirus spreads", "no", "a VARKO b"]
    seqs = tokenize(texts, tok, 64)
    path = _list(tmp_path, "varko", "virus")
    miss = kw.keyword_masks(path, texts, seqs, tok, 64)
    assert [p.name for p in own_cache.iterdir()] == [kw.cache_key(["varko", "virus"], texts, seqs, tok, 64) + ".json"]

    def not_again(*args, **kwargs):
        raise AssertionError("computed again despite the cache")

    monkeypatch.setattr(kw, "compute_masks", not_again)
    assert kw.keyword_masks(path, texts, seqs, tok, 64) == miss
    assert miss.positions == [[1, 2, 3], [], [3, 4, 5, 6, 7]]  # <s> a Ġ V A R K O: no merge in capitals
    # another list, other texts or another max_length is another key: computed, not read
    with pytest.raises(AssertionError, match="computed again"):
        kw.keyword_masks(_list(tmp_path, "varko", name="other.txt"), texts, seqs, tok, 64)
    with pytest.raises(AssertionError, match="computed again"):
        kw.keyword_masks(path, texts[:2], seqs[:2], tok, 64)
    # a damaged cache file is computed again (and rewritten), never trusted
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    (cached,) = own_cache.iterdir()
    cached.write_text(json.dumps({"format": kw.CACHE_FORMAT, "positions": [[99], [], []]}))
    assert kw.keyword_masks(path, texts, seqs, tok, 64) == miss
    assert json.loads(cached.read_text())["positions"] == miss.positions


def test_the_tokenizer_key_ignores_the_truncation_a_call_leaves_on_it():
    tok = bpe_with_bos()
    before = kw.cache_key(["a"], ["t"], [[1]], tok, 8)
    tok(["x y z"], truncation=True, max_length=2)
    assert kw.cache_key(["a"], ["t"], [[1]], tok, 8) == before
    assert kw.cache_key(["a"], ["t"], [[1]], byte_tokenizer(), 8) != before


# ---------------------------------------------------------------- the engine


def _keyword_engine(tmp_path, words=("plasmid",), **overrides):
    from test_engine import make_engine

    path = _list(tmp_path, *words)
    return make_engine(tmp_path, **{"lora_dropout": 0.0, "forget_loss": "max_entropy", **overrides,
                                    "forget_keywords": str(path)})


def _per_token_loss(engine, batch: dict, layer: int, row: int, t: int) -> float:
    """The objective's forget loss at the one token ``t`` of ``row`` (its mean over one token)."""
    width = batch["input_ids"].shape[1]
    one = {**batch, "index": torch.tensor([row * width + t])}
    with torch.no_grad():
        return engine.objective.forget_loss(one, layer).item()


def test_load_batches_keeps_the_positions_of_the_keyword_and_counts_rows_without_one(tmp_path, capsys):
    engine = _keyword_engine(tmp_path)
    texts = load_texts(CorpusSpec("tiny:forget"), limit=16, seed=42)  # the tiny preset's forget corpus
    by_hand = [[i for m in re.finditer("plasmid", t) for i in range(m.start(), m.end()) if i < 64] for t in texts]
    assert engine.data.forget_keep == by_hand and any(by_hand) and not all(by_hand)
    c = engine.data.counts["forget"]
    tokens = sum(len(s) for s in engine.data.forget)
    assert (c["keyword_unmatched"], c["keyword_masked_tokens"]) == (sum(not p for p in by_hand),
                                                                    sum(map(len, by_hand)))
    assert c["keyword_masked_share"] == pytest.approx(sum(map(len, by_hand)) / tokens, abs=1e-6)
    assert "forget keywords" in capsys.readouterr().out


def test_the_forget_loss_counts_only_the_masked_tokens(tmp_path):
    """Value by hand: the mean of the objective's per-token forget loss over the masked tokens alone, and
    each micro-batch weighted alike (a row group by its masked tokens, not its real ones)."""
    engine = _keyword_engine(tmp_path, row_group_tokens=0)  # several row groups per micro-batch
    layer = engine.layers[0]
    batches = list(engine._micro_batches(0, 0))
    assert any(any(fb.keep) for _, fb, _ in batches)
    want = []
    for _, fb, _ in batches:
        batch = collate(_rows(fb), engine.data.pad_id)
        tokens = [_per_token_loss(engine, batch, layer, r, t) for r, pos in enumerate(fb.keep) for t in pos]
        want.append(sum(tokens) / len(tokens) if tokens else 0.0)
    for (_, fb, _), w in zip(batches, want):
        engine.model.zero_grad(set_to_none=True)
        got = engine._backward_in_parts(fb, lambda part: engine.objective.forget_loss(part, layer), 1.0)
        assert got.item() == pytest.approx(w, rel=1e-5)
    engine.model.zero_grad(set_to_none=True)
    line = engine.optimizer_step(0, layer)  # the logged loss: the mean over micro-batches of the above
    assert line["forget_loss"] == pytest.approx(sum(want) / len(want), rel=1e-5)


def _rows(fb) -> list[list[int]]:
    """The token ids of a host batch's rows (from its device tensors and lengths)."""
    ids = fb.tensors["input_ids"].cpu()
    return [ids[r, :n].tolist() for r, n in enumerate(fb.lengths)]


def test_a_micro_batch_without_a_masked_token_adds_nothing(tmp_path):
    engine = _keyword_engine(tmp_path)
    rows = [engine.data.forget[i] for i, keep in enumerate(engine.data.forget_keep) if not keep][:2]
    fb = engine._host_batch(rows, [[], []])
    engine.model.zero_grad(set_to_none=True)
    calls = []
    loss = engine._backward_in_parts(fb, lambda part: calls.append(part) or torch.tensor(1.0), 1.0)
    assert loss.item() == 0.0 and not calls


def test_random_targets_are_drawn_per_masked_token_reproducibly(tmp_path):
    engine = _keyword_engine(tmp_path, ("plasmid", "virus"), forget_loss="random_ce")
    layer = engine.layers[0]
    (_, fb, _), *_ = engine._micro_batches(0, 0)
    assert any(fb.keep) and not all(len(k) == n for k, n in zip(fb.keep, fb.lengths))
    drawn = []
    losses = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(3)
        engine.model.zero_grad(set_to_none=True)
        losses.append(engine._backward_in_parts(
            fb, lambda part: drawn.append(part["index"].numel()) or engine.objective.forget_loss(part, layer, gen),
            1.0).item())
    assert losses[0] == losses[1] and sum(drawn) == 2 * sum(map(len, fb.keep))


def test_a_whole_run_records_the_masks_in_provenance_the_card_and_a_printed_line(tmp_path, capsys, snapshot):
    from sequnlearn.runs import RunDir, prepare_out_dir, read_json, read_jsonl
    from sequnlearn.unlearn.engine import unlearn

    path = _list(tmp_path, "PLASMID")
    cfg = load_config(preset="tiny", overrides=[f"forget_keywords={path}", "layers=[3]"])
    run = RunDir(prepare_out_dir(tmp_path / "r"))
    unlearn(cfg, run)
    c = read_json(run.provenance)["corpora"]["forget"]
    assert c["keyword_list"] == str(path) and 0 < c["keyword_unmatched"] < c["used"]
    assert 0 < c["keyword_masked_share"] < 1
    card = (run.root / "model" / "README.md").read_text()
    assert f"`{path}` chose {c['keyword_masked_tokens']} tokens" in card
    assert f"{c['keyword_unmatched']} of {c['used']} forget examples had no match" in card
    assert "forget keywords" in capsys.readouterr().out
    assert all(x["forget_loss"] == x["forget_loss"] for x in read_jsonl(run.metrics))  # finite, not NaN
    # a list that matches nothing: one line, nothing written
    none = _list(tmp_path, "zzzz", name="none.txt")
    out = tmp_path / "r2"
    before = snapshot(tmp_path / "r", tmp_path / "xdg")
    with pytest.raises(UserError, match="matches no token"):
        unlearn(load_config(preset="tiny", overrides=[f"forget_keywords={none}"]), RunDir(prepare_out_dir(out)))
    assert snapshot(tmp_path / "r", tmp_path / "xdg") == before and not (out.exists() and any(out.iterdir()))


# ---------------------------------------------------------------- the toy world's keyword list


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from sequnlearn.toyworld import ToyWorldConfig, build_world

    return build_world(tmp_path_factory.mktemp("toyworld") / "w", ToyWorldConfig.reduced(), progress=False, threads=1)


def test_the_toy_world_lists_its_hazardous_entity_names(world):
    from sequnlearn.toyworld import ToyWorldConfig

    facts = json.loads(world.facts.read_text())
    names = kw.read_keywords(world.forget_keywords)
    assert sorted(names) == sorted(facts["forget"]["entities"])  # every pathogen once, no city
    assert len(names) == ToyWorldConfig.reduced().forget_entities and not set(names) & set(facts["retain"]["entities"])


def test_the_toy_keyword_list_masks_the_entity_names_in_the_world_s_own_tokens(world):
    from sequnlearn.model.load import load_model

    _, tok = load_model(str(world.model), dtype="fp32", device="cpu")
    texts = [json.loads(line)["text"] for line in world.forget_corpus.read_text().splitlines()]
    seqs = tokenize(texts, tok, 128)
    got = kw.keyword_masks(world.forget_keywords, texts, seqs, tok, 128)
    names = kw.read_keywords(world.forget_keywords)
    assert got.unmatched == 0 and 0 < got.share < 0.5
    text = tok.decode([seqs[0][i] for i in got.positions[0]])
    first = re.search("|".join(names), tok.decode(seqs[0])).group()
    assert first in text  # the masked tokens spell out the names


def test_a_world_built_before_the_keyword_list_gets_it_in_place(world, capsys):
    from sequnlearn.cli import main

    weights = world.model / "model.safetensors"
    before = (weights.stat().st_ino, weights.stat().st_mtime_ns)
    want = world.forget_keywords.read_text()
    world.forget_keywords.unlink()  # as a world built before the file existed
    main(["toyworld", "build", "--out", str(world.root), "--reduced", "--quiet", "--threads", "1"])
    assert world.forget_keywords.read_text() == want
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == before  # reused, not pretrained again
    assert str(world.forget_keywords) in capsys.readouterr().out


def test_resume_refuses_a_keyword_list_whose_masks_changed(tmp_path):
    from sequnlearn.runs import RunDir
    from sequnlearn.unlearn.engine import check_resume_inputs

    def prov(sha):
        return {"data": {"forget": {"token_ids_sha256": "a"}}, "corpora": {"forget": {"keyword_masks_sha256": sha}}}

    check_resume_inputs(prov("m1"), prov("m1"), RunDir(tmp_path))
    check_resume_inputs({"data": {}}, prov("m1"), RunDir(tmp_path))  # a run from before the key: not checked
    with pytest.raises(UserError, match="the forget keyword masks"):
        check_resume_inputs(prov("m1"), prov("m2"), RunDir(tmp_path))
