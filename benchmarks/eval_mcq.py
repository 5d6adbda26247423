"""Fast MCQ backend vs the lm-eval backend: questions per second on the same model and questions.

The model is a randomly initialised GPT-NeoX of Pythia-160M's shape (12 layers, hidden 768, vocab
50304), built from a config (``--small``: 4 layers, hidden 256, same vocab, shorter questions, for
a CPU). The tokenizer is sequnlearn's byte-level one (no download), so prompts are about four
times as many tokens as with Pythia's BPE. Both backends score the same generated questions; the
timing covers the whole ``evaluate`` call (data handling, tokenization, forwards), after a warm-up.

    python benchmarks/eval_mcq.py --small
    python benchmarks/eval_mcq.py --n 500 --style cloze --json /tmp/cloze.json

Prints one summary line per ratio and writes JSON to ``benchmarks/results/eval_mcq.json``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from sequnlearn.data.mcq import MCQRecord, save_mcq_file  # noqa: E402
from sequnlearn.eval import evaluate, load_tasks  # noqa: E402
from sequnlearn.model.tiny import byte_tokenizer  # noqa: E402
from sequnlearn.runs import write_json  # noqa: E402

TARGET = 3.0
SHAPES = {
    "pythia-160m": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
    "small": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024),
}
WORDS = ("cell protein virus strain host gene vector assay culture sample membrane receptor enzyme "
         "sequence plasmid antibody pathogen replication expression mutation binding tissue dose "
         "which what following most likely primary method would result increase reduce method").split()


def build_model(shape: str, device: torch.device) -> torch.nn.Module:
    """A random GPT-NeoX of the named shape (Pythia's vocab 50304, rotary 25%, parallel residual)."""
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    cfg = GPTNeoXConfig(vocab_size=50304, max_position_embeddings=2048, rotary_pct=0.25, use_parallel_residual=True,
                        bos_token_id=256, eos_token_id=256, tie_word_embeddings=False, **SHAPES[shape])
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device).eval()


def make_questions(n: int, small: bool, seed: int = 0) -> list[MCQRecord]:
    """``n`` four-choice questions of random words (WMDP-like lengths; shorter with ``small``)."""
    rng = random.Random(seed)
    q_len, c_len = ((8, 20), (1, 5)) if small else ((20, 60), (2, 12))

    def words(lo_hi: tuple[int, int]) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(*lo_hi)))

    return [MCQRecord(words(q_len).capitalize() + "?", [words(c_len) for _ in range(4)], rng.randrange(4),
                      f"cat{i % 6}", "biology") for i in range(n)]


def timed(model, tok, tasks, backend: str, style: str, batch_size: int) -> tuple[dict, float]:
    """One ``evaluate`` call and its wall time."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    res = evaluate(model, tok, tasks, backend=backend, style=style, batch_size=batch_size, progress=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return res, time.perf_counter() - start


def compare(model, tok, tasks, style: str, batch_size: int) -> dict:
    """Time both backends on ``tasks``; check that their predictions agree."""
    import lm_eval  # noqa: F401  (import time is not evaluation time)

    evaluate(model, tok, tasks, backend="fast", style=style, limit=4, batch_size=batch_size, progress=False)
    fast, t_fast = timed(model, tok, tasks, "fast", style, batch_size)
    harness, t_harness = timed(model, tok, tasks, "lm-eval", style, batch_size)
    name = tasks[0].name
    pf, ph = fast["tasks"][name]["predictions"], harness["tasks"][name]["predictions"]
    n = len(pf)
    agree = sum(a["pred"] == b["pred"] for a, b in zip(pf, ph))
    diff = max(abs(x - y) for a, b in zip(pf, ph) for x, y in zip(a["loglikelihoods"], b["loglikelihoods"]))
    return {"style": style, "questions": n,
            "fast": {"seconds": t_fast, "questions_per_second": n / t_fast, "acc": fast["tasks"][name]["acc"]},
            "lm_eval": {"seconds": t_harness, "questions_per_second": n / t_harness,
                        "acc": harness["tasks"][name]["acc"]},
            "ratio": t_harness / t_fast, "predictions_agree": agree,
            "max_abs_loglikelihood_diff": diff}


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and write its JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="4 layers, hidden 256, shorter questions (CPU)")
    p.add_argument("--n", type=int, default=500, help="questions (default 500)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--style", choices=["letter", "cloze", "both"], default="letter")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "eval_mcq.json"))
    args = p.parse_args(argv)

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    shape = "small" if args.small else "pythia-160m"
    model, tok = build_model(shape, device), byte_tokenizer()
    styles = ["letter", "cloze"] if args.style == "both" else [args.style]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "questions.jsonl"
        save_mcq_file(path, make_questions(args.n, args.small))
        tasks = load_tasks([str(path)])
        runs = [compare(model, tok, tasks, style, args.batch_size) for style in styles]
    for r in runs:
        print(f"eval_mcq {shape} {r['style']}: fast {r['fast']['questions_per_second']:.2f} q/s, lm-eval "
              f"{r['lm_eval']['questions_per_second']:.2f} q/s, ratio {r['ratio']:.2f}x (target >= {TARGET:.0f}x), "
              f"predictions agree {r['predictions_agree']}/{r['questions']}")
    params = sum(t.numel() for t in model.parameters())
    write_json(args.json, {"benchmark": "eval_mcq", "shape": shape, "config": SHAPES[shape], "parameters": params,
                           "device": str(device), "dtype": str(next(model.parameters()).dtype),
                           "tokenizer": "sequnlearn byte-level (257 tokens)", "batch_size": args.batch_size,
                           "torch_threads": torch.get_num_threads(), "target_ratio": TARGET, "runs": runs})
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
