"""Naive vs sequnlearn unlearning step on a GPU: tokens/s, MFU and the largest batch that fits (bf16).

The model is a randomly initialised GPT-NeoX of Pythia-1B's shape (16 layers, hidden 2048, vocab
50304; ``--shape deep-ignorance-6.9b`` for the reference's 6.86B) in bf16, max length 2048; the two
variants and the batches are those of ``unlearn_step.py`` (naive: deep-copied original, full
forwards, padding to max length; sequnlearn: ``Unlearner.optimizer_step``), with gradient
checkpointing in both or in neither (``--checkpointing``). For each variant the per-device batch size doubles from 1 until the GPU runs out of memory; every batch
size that fits is timed (median of the measured steps). MFU counts the FLOPs the method needs on
the real tokens (the same count for both variants, see :func:`useful_flops`) against the GPU's
dense bf16 peak.

    python benchmarks/gpu_step.py                        # realistic lengths, L2 and KL
    python benchmarks/gpu_step.py --lengths fixed --retain l2 --max-batch 16
    # the reference's shape: 6.86B GPT-NeoX, gradient checkpointing, forget rows of 2048 tokens and
    # lognormal retain rows (one command, about 5 minutes on an H200)
    python benchmarks/gpu_step.py --shape deep-ignorance-6.9b --checkpointing --lengths reference \
        --retain l2 --max-batch 4 --steps 2 --warmup 1

Needs a CUDA GPU: on a machine without one it stops with a message (exit status 2). Writes JSON
to ``benchmarks/results/gpu_step.json`` (or ``--json``).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from _common import RESULTS, SHAPES, Worker, gpt_neox, median, mib, serve  # noqa: E402
from unlearn_step import Naive, Setup, engine_runner, make_batches  # noqa: E402

PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0}


def peak_flops(override: float | None) -> float | None:
    """Dense bf16 peak FLOP/s of this GPU (``--peak-tflops`` or a known name), None if unknown."""
    if override:
        return override * 1e12
    name = torch.cuda.get_device_name()
    return next((t * 1e12 for key, t in PEAK_BF16_TFLOPS.items() if key in name), None)


def useful_flops(batch: tuple[list[list[int]], list[list[int]]], layer_count: int, retain: str,
                 shape: str = "pythia-1b") -> float:
    """FLOPs the method needs for one step on the real tokens of ``batch`` (forget, retain).

    Per token a linear layer of P weights costs 2P forward and 2P backward (input gradients only: the
    base weights are frozen; LoRA's share is ignored); causal attention over a sequence of n tokens
    costs 2n(n+1)D per layer forward and twice that backward. Forget: every layer and the head,
    forward and backward. Retain: original and current forward plus current backward, through the
    head too for KL.
    """
    c = SHAPES[shape]
    D, V = c["hidden_size"], c["vocab_size"]
    p_layer = 4 * D * D + 2 * D * c["intermediate_size"]

    def passes(seqs: list[list[int]], fwd: int, bwd: int, head: bool) -> float:
        tokens = sum(len(q) for q in seqs)
        attention = sum(2 * len(q) * (len(q) + 1) * D for q in seqs) * layer_count
        linear = 2 * tokens * (p_layer * layer_count + (D * V if head else 0))
        return (fwd + bwd) * linear + (fwd + 2 * bwd) * attention

    forget, kept = batch
    return passes(forget, 1, 1, True) + passes(kept, 2, 1, retain == "kl")


def try_batch(s: Setup) -> dict:
    """Build the variant at ``s.batch_size`` and time its steps; ``{"oom": True}`` when it does not fit."""
    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats(device)
    batches = make_batches(s)
    try:
        model = gpt_neox(s.shape, dtype=torch.bfloat16, device=device, max_len=s.max_len)
        step = Naive(model, s, device).step if s.variant == "naive" else engine_runner(model, s, batches, device)
        rows = []
        for i, batch in enumerate(batches):
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            line = step(i, batch)
            torch.cuda.synchronize(device)
            rows.append({"seconds": time.perf_counter() - start, "forget_loss": line["forget_loss"],
                         "retain_loss": line["retain_loss"],
                         "real_tokens": sum(len(q) for part in batch for q in part),
                         "flops": useful_flops(batch, SHAPES[s.shape]["num_hidden_layers"], s.retain, s.shape)})
    except torch.cuda.OutOfMemoryError:
        return {"batch_size": s.batch_size, "oom": True}
    finally:
        model = step = None  # noqa: F841 (free before the next size)
        gc.collect()
        torch.cuda.empty_cache()
    measured = rows[s.warmup:]
    sec = median([r["seconds"] for r in measured])
    per_step = {k: sum(r[k] for r in measured) / len(measured) for k in ("real_tokens", "flops")}
    return {"batch_size": s.batch_size, "oom": False, "seconds_per_step": sec,
            "tokens_per_s": per_step["real_tokens"] / sec, "flops_per_s": per_step["flops"] / sec,
            "peak_memory_mib": mib(torch.cuda.max_memory_allocated(device)),
            "losses": [{k: r[k] for k in ("forget_loss", "retain_loss")} for r in rows]}


def worker(s: Setup, max_batch: int) -> None:
    """Double the batch size from 1 until out of memory (or ``max_batch``); answer with every size tried."""
    def handle(msg: dict) -> dict:
        sizes = []
        b = 1
        while b <= max_batch:
            res = try_batch(Setup(**{**asdict(s), "batch_size": b}))
            sizes.append(res)
            if res["oom"]:
                break
            b *= 2
        return {"sizes": sizes, "device": torch.cuda.get_device_name()}

    serve({"ready": True}, handle)


def compare(base: Setup, lengths: str, retain: str, max_batch: int, peak: float | None) -> dict:
    """Both variants of one setting (each in its own process, one after the other)."""
    out: dict = {"lengths": lengths, "retain": retain}
    for v in ("naive", "sequnlearn"):
        s = Setup(**{**asdict(base), "variant": v, "lengths": lengths, "retain": retain})
        w = Worker(__file__, ["--worker", json.dumps({"setup": asdict(s), "max_batch": max_batch})])
        w.read()
        res = w.request({"cmd": "run"})
        w.close()
        fits = [r for r in res["sizes"] if not r["oom"]]
        for r in fits:
            r["mfu"] = r["flops_per_s"] / peak if peak else None
        out[v] = {"sizes": res["sizes"], "largest_batch": max((r["batch_size"] for r in fits), default=0),
                  "best_tokens_per_s": max((r["tokens_per_s"] for r in fits), default=0.0)}
    n, q = out["naive"], out["sequnlearn"]
    out["tokens_per_s_ratio"] = q["best_tokens_per_s"] / n["best_tokens_per_s"] if n["best_tokens_per_s"] else None
    out["largest_batch_ratio"] = q["largest_batch"] / n["largest_batch"] if n["largest_batch"] else None
    out["loss_match"] = _losses_agree(n["sizes"], q["sizes"])
    return out


def _losses_agree(a: list[dict], b: list[dict], rtol: float = 3e-2) -> bool | None:
    """Losses of the batch sizes both variants ran agree within bf16 tolerance (None: none in common)."""
    pairs = [(x, y) for x in a for y in b if x["batch_size"] == y["batch_size"] and not (x["oom"] or y["oom"])]
    if not pairs:
        return None
    return all(abs(p[k] - q[k]) <= 1e-3 + rtol * abs(p[k]) for x, y in pairs
               for p, q in zip(x["losses"], y["losses"]) for k in ("forget_loss", "retain_loss"))


def report(runs: list[dict]) -> None:
    """One line per batch size and one summary line per setting."""
    for r in runs:
        for v in ("naive", "sequnlearn"):
            for s in r[v]["sizes"]:
                if s["oom"]:
                    print(f"{r['lengths']:9s} {r['retain']} {v:10s} batch {s['batch_size']:3d}: out of memory")
                    continue
                mfu = f"{100 * s['mfu']:.1f}%" if s.get("mfu") is not None else "n/a"
                print(f"{r['lengths']:9s} {r['retain']} {v:10s} batch {s['batch_size']:3d}: "
                      f"{s['tokens_per_s']:.0f} tok/s, MFU {mfu}, peak {s['peak_memory_mib']:.0f} MiB")
        ratio, name = r["tokens_per_s_ratio"], f"gpu_step {r['lengths']} {r['retain']}"
        if ratio is None:
            print(f"{name}: the naive variant fit no batch size")
            continue
        print(f"{name}: best tokens/s sequnlearn / naive = {ratio:.2f}x, largest batch "
              f"{r['sequnlearn']['largest_batch']} vs {r['naive']['largest_batch']}, losses match {r['loss_match']}")


def main(argv: list[str] | None = None) -> None:
    """Check for a GPU, measure every requested setting, write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=list(SHAPES), default="pythia-1b")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in both variants")
    p.add_argument("--lengths", choices=["realistic", "fixed", "reference", "both"], default="realistic")
    p.add_argument("--retain", choices=["l2", "kl", "both"], default="both")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--max-batch", type=int, default=64, help="largest per-device batch size tried")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak of this GPU, for MFU (default: by name)")
    p.add_argument("--json", default=str(RESULTS / "gpu_step.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_step.py needs a CUDA GPU and torch.cuda.is_available() is False here; "
              "on a CPU run benchmarks/unlearn_step.py --small instead", file=sys.stderr)
        raise SystemExit(2)
    if args.worker:
        msg = json.loads(args.worker)
        worker(Setup(**msg["setup"]), msg["max_batch"])
        return
    depth = SHAPES[args.shape]["num_hidden_layers"]
    base = Setup("", args.shape, "", "", depth * 22 // 32, 1, args.max_length, args.max_length // 8, 1.0, args.steps,
                 args.warmup, 0, "cuda", 0, args.checkpointing)
    peak = peak_flops(args.peak_tflops)
    settings = [(ln, rt) for ln in (["realistic", "fixed"] if args.lengths == "both" else [args.lengths])
                for rt in (["l2", "kl"] if args.retain == "both" else [args.retain])]
    runs = [compare(base, ln, rt, args.max_batch, peak) for ln, rt in settings]
    report(runs)
    from sequnlearn.runs import write_json

    write_json(args.json, {"benchmark": "gpu_step", "shape": args.shape, "config": SHAPES[args.shape],
                           "device": torch.cuda.get_device_name(), "peak_flops": peak, "setup": asdict(base),
                           "torch": torch.__version__, "runs": runs})
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
