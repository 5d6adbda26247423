"""ATen ops per optimizer step under CPU bf16 autocast: the CPU-side evidence of a GPU step's kernel launches.

On a GPU nearly every ATen op that computes something is about one kernel launch (views and
allocations launch none), and a step bound by launches costs its op count times a few microseconds.
How many ops a step makes depends on the depth, the row groups, the head chunks and the micro-batches,
not on the width or the vocabulary: so it is counted on the CPU at Pythia-1B's depth (16 layers, 8
heads) and realistic lengths (lognormal, median 256, max 2048) but a narrow width (``pythia-1b-w64``:
hidden 64; ``pythia-1b-w128`` checks the independence), with a bf16 model under bf16 autocast, as
``gpu_step.py`` runs on a GPU (the autocast casts are ops too).

A ``TorchDispatchMode`` counts every op that reaches the backend during the counted steps (by default
the batches ``stepprof.py`` profiled on the GPU for issue #26, indices 4 and 5 of the seeded
sequence, after one uncounted warm-up step), and records the shapes ``(B, heads, T, head dim)`` of the
attention forward calls: cuDNN attention builds an execution plan for each new shape. Variants: the
naive reference pattern, and the engine with the CPU settings and with the GPU settings of
``sequnlearn.unlearn.kernels`` (``row_group_tokens``, ``pad_multiple``, ``head_chunk_rows``,
``sdpa_backend``: the values their ``auto`` takes on each device).

    python benchmarks/op_count.py                          # README table: batch 1 and 8, L2 and KL
    python benchmarks/op_count.py --shapes pythia-1b-w64,pythia-1b-w128 --batch-sizes 8 --retain l2

Prints a Markdown table; writes JSON to ``benchmarks/results/op_count.json`` (or ``--json``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from _common import RESULTS, SHAPES, SYNC_OPS, gpt_neox  # noqa: E402
from unlearn_step import Naive, Setup, engine_runner, make_batches  # noqa: E402

NO_KERNEL = {"aten::empty", "aten::empty_strided", "aten::_unsafe_view", "aten::lift_fresh", "aten::set_",
             "aten::resize_", "aten::_local_scalar_dense"}
"""Ops that are not views yet launch no kernel (allocations, metadata; a scalar read is a copy and a sync)."""
TOP = 12


def variants() -> dict[str, tuple[str, dict]]:
    """Variant name → (benchmark variant, engine config overrides), each under bf16 autocast."""
    from sequnlearn.unlearn.kernels import CPU_DEFAULTS, GPU_DEFAULTS

    bf16 = {"mixed_precision": "bf16"}
    return {"naive": ("naive", bf16), "engine-cpu": ("sequnlearn", {**bf16, **CPU_DEFAULTS}),
            "engine-gpu": ("sequnlearn", {**bf16, **GPU_DEFAULTS})}


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops that reach the backend, and the shapes of the attention forward calls."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.kernels = 0  # ops that are neither views nor allocations: about one GPU kernel launch each
        self.attention: list[tuple[int, ...]] = []  # query shape of each attention forward call

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        """Count ``func``, then run it."""
        name = func._schema.name
        self.ops[name] += 1
        self.kernels += not (func.is_view or name in NO_KERNEL)
        if "scaled_dot_product" in name and "backward" not in name:
            self.attention.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def passes(s: Setup, batch: tuple[list[list[int]], list[list[int]]]) -> tuple[int, int]:
    """Row groups (forward and backward passes) and padded tokens of one step's forget and retain micro-batch."""
    if s.variant == "naive":
        return 2, sum(len(part) * s.max_len for part in batch)
    from sequnlearn.unlearn.kernels import round_up, row_groups

    groups = padded = 0
    for part in batch:
        lengths = [len(q) for q in part]
        cap = round_up(max(lengths), s.overrides["pad_multiple"])  # the micro-batch's padded width
        cuts = row_groups(lengths, s.overrides["row_group_tokens"], s.overrides["pad_multiple"])
        groups += len(cuts)
        padded += sum((b - a) * min(round_up(max(lengths[a:b]), s.overrides["pad_multiple"]), cap) for a, b in cuts)
    return groups, padded


def count(s: Setup, at: list[int]) -> dict:
    """Build the variant, take one uncounted warm-up step, count the ops of the steps on batches ``at``."""
    device = torch.device("cpu")
    batches = make_batches(s)
    model = gpt_neox(s.shape, dtype=torch.bfloat16, device=device, max_len=s.max_len)
    step = Naive(model, s, device).step if s.variant == "naive" else engine_runner(model, s, batches, device)
    step(0, batches[0])  # AdamW's state is made on the first step
    per_step, shapes = [], set()
    start = time.perf_counter()
    for i in at:
        with OpCounter() as c:
            step(i, batches[i])
        groups, padded = passes(s, batches[i])
        shapes |= set(c.attention)
        per_step.append({"ops": sum(c.ops.values()), "kernel_ops": c.kernels,
                         "sync_ops": sum(c.ops[k] for k in SYNC_OPS),
                         "attention_calls": len(c.attention), "attention_shapes": len(set(c.attention)),
                         "row_groups": groups, "padded_tokens": padded,
                         "real_tokens": sum(len(q) for part in batches[i] for q in part), "top": c.ops})
    n = len(per_step)
    top = sum((r.pop("top") for r in per_step), Counter())
    out = {k: sum(r[k] for r in per_step) / n for k in per_step[0]}
    return {**out, "attention_shapes_all_steps": len(shapes), "attention_lengths": sorted({q[2] for q in shapes}),
            "seconds_per_step": (time.perf_counter() - start) / n,
            "top_ops": [{"name": k, "calls_per_step": v / n} for k, v in top.most_common(TOP)], "steps": per_step}


def table(rows: list[dict]) -> str:
    """The Markdown table of the README."""
    head = ("| shape | retain | batch | variant | row groups | padded / real tokens | ATen ops | kernel ops "
            "| attention calls | attention shapes (per step / all counted steps) |\n|" + "---|" * 10)
    lines = [head]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['retain']} | {r['batch_size']} | {r['variant']} | {r['row_groups']:.1f} | "
                     f"{r['padded_tokens']:.0f} / {r['real_tokens']:.0f} | {r['ops']:.0f} | {r['kernel_ops']:.0f} | "
                     f"{r['attention_calls']:.0f} | {r['attention_shapes']:.1f} / {r['attention_shapes_all_steps']} |")
    return "\n".join(lines)


def width_check(rows: list[dict]) -> list[dict]:
    """Rows of the same variant, retain loss and batch at different shapes: whether their op counts agree."""
    out = []
    for r in rows:
        same = [q for q in rows if q["shape"] != r["shape"] and all(q[k] == r[k] for k in ("variant", "retain",
                                                                                          "batch_size"))]
        if same and r["shape"] < same[0]["shape"]:
            q = same[0]
            out.append({"variant": r["variant"], "retain": r["retain"], "batch_size": r["batch_size"],
                        "shapes": [r["shape"], q["shape"]], "ops": [r["ops"], q["ops"]],
                        "equal": all(r[k] == q[k] for k in ("ops", "kernel_ops", "attention_calls"))})
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="pythia-1b-w64", help="comma-separated shapes of _common.SHAPES")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated micro-batch sizes")
    p.add_argument("--retain", default="l2,kl", help="comma-separated retain losses")
    p.add_argument("--variants", default="naive,engine-cpu,engine-gpu")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--at", default="4,5", help="indices of the counted steps' batches in the seeded sequence")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's choice)")
    p.add_argument("--json", default=str(RESULTS / "op_count.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Count every requested (shape, retain loss, batch size, variant); print the table, write the JSON."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    at, known = [int(i) for i in args.at.split(",")], variants()
    rows = []
    for shape in args.shapes.split(","):
        layer = SHAPES[shape]["num_hidden_layers"] * 22 // 32
        for retain in args.retain.split(","):
            for b in (int(x) for x in args.batch_sizes.split(",")):
                for name in args.variants.split(","):
                    variant, overrides = known[name]
                    s = Setup(variant, shape, "realistic", retain, layer, b, args.max_length, args.max_length // 8,
                              1.0, max(at) - 1, 2, 0, "cpu", args.threads, False, overrides)
                    rows.append({"shape": shape, "retain": retain, "batch_size": b, "variant": name, **count(s, at)})
                    print(f"{shape} {retain} batch {b} {name}: {rows[-1]['kernel_ops']:.0f} kernel ops per step "
                          f"({rows[-1]['seconds_per_step']:.1f} s/step)", file=sys.stderr, flush=True)
    print(table(rows))
    from sequnlearn.runs import write_json

    write_json(args.json, {"benchmark": "op_count", "torch": torch.__version__, "at": at,
                           "settings": {k: v for k, (_, v) in known.items()}, "config": {s: SHAPES[s] for s in
                                                                                        args.shapes.split(",")},
                           "width_check": width_check(rows), "rows": rows})
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
