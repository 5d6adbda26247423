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

``--profile`` adds, for every batch size that fits, one or more further optimizer steps of each variant
under torch.profiler: kernel launches per step, GPU busy share (summed kernel time ÷ the unprofiled step
time), host syncs per step and the top ops by GPU time and by CPU time (see :func:`profile_steps`).
``--set KEY=VALUE`` sets an engine config key for both variants (e.g. ``--set sdpa_backend=default``).

Needs a CUDA GPU: on a machine without one it stops with a message (exit status 2), unless ``--device
cpu`` is given (a smoke run of the script itself, fp32: no launches, no GPU time, the op counts and the
CPU top ops still come out). Writes JSON to ``benchmarks/results/gpu_step.json`` (or ``--json``).
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

from _common import (RESULTS, SHAPES, SYNC_OPS, Worker, device_name, gpt_neox, median, mib, model_dtype,  # noqa: E402
                     peak_memory_bytes, serve, synchronize)
from unlearn_step import Naive, Setup, engine_runner, make_batches, with_overrides  # noqa: E402

from torch.autograd import DeviceType  # noqa: E402

PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0}
RUNTIME_SYNCS = ("cudaStreamSynchronize", "cudaEventSynchronize")
"""CUDA runtime calls where the host waits (the benchmark's own ``cudaDeviceSynchronize`` is not counted)."""
LAUNCHES = ("LaunchKernel", "cudaGraphLaunch")
"""Substrings of the CUDA runtime calls that launch kernels (``cudaLaunchKernel``, ``cuLaunchKernelEx``, ...)."""
TOP_OPS = 15


def peak_flops(override: float | None, device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of this GPU (``--peak-tflops`` or a known name), None if unknown."""
    if override:
        return override * 1e12
    name = device_name(device)
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


def timed_step(step, i: int, batch, s: Setup, device: torch.device) -> dict:
    """Run and time optimizer step ``i``; its wall time, losses, real tokens and useful FLOPs."""
    synchronize(device)
    start = time.perf_counter()
    line = step(i, batch)
    synchronize(device)
    return {"seconds": time.perf_counter() - start, "forget_loss": line["forget_loss"],
            "retain_loss": line["retain_loss"], "real_tokens": sum(len(q) for part in batch for q in part),
            "flops": useful_flops(batch, SHAPES[s.shape]["num_hidden_layers"], s.retain, s.shape)}


def try_batch(s: Setup, profile: int = 0) -> dict:
    """Build the variant at ``s.batch_size``, time its steps and profile ``profile`` more; ``{"oom": True}``
    when it does not fit."""
    device = torch.device(s.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batches = make_batches(s)
    model = step = None
    try:
        model = gpt_neox(s.shape, dtype=model_dtype(device), device=device, max_len=s.max_len)
        step = Naive(model, s, device).step if s.variant == "naive" else engine_runner(model, s, batches, device)
        rows = [timed_step(step, i, batch, s, device) for i, batch in enumerate(batches)]
        peak = peak_memory_bytes(device)  # of the timed steps (the profiler's own buffers are not the step's)
        prof = profile_steps(step, batches, device, profile) if profile else None
    except torch.cuda.OutOfMemoryError:
        return {"batch_size": s.batch_size, "oom": True}
    finally:
        model = step = None  # noqa: F841 (free before the next size)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    measured = rows[s.warmup:]
    sec = median([r["seconds"] for r in measured])
    per_step = {k: sum(r[k] for r in measured) / len(measured) for k in ("real_tokens", "flops")}
    out = {"batch_size": s.batch_size, "oom": False, "seconds_per_step": sec,
           "tokens_per_s": per_step["real_tokens"] / sec, "flops_per_s": per_step["flops"] / sec,
           "peak_memory_mib": mib(peak), "losses": [{k: r[k] for k in ("forget_loss", "retain_loss")} for r in rows]}
    if prof is not None:
        out["profile"] = {**prof, "gpu_busy_share": prof["kernel_seconds_per_step"] / sec}
    return out


def profile_steps(step, batches: list, device: torch.device, n: int) -> dict:
    """The last ``n`` batches' optimizer steps once more, under torch.profiler; what :func:`profile_summary` says."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    idx = range(len(batches) - n, len(batches))
    synchronize(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for i in idx:
            step(i, batches[i])
        synchronize(device)  # every kernel inside the profile
    wall = (time.perf_counter() - start) / n
    tokens = sum(len(q) for i in idx for part in batches[i] for q in part) / n
    return {"steps": n, "seconds_per_step_profiled": wall, "real_tokens_per_step": tokens,
            **profile_summary(prof.key_averages(), n, device)}


def profile_summary(events, n: int, device: torch.device) -> dict:
    """Per-step figures of ``n`` profiled steps from ``key_averages()``.

    Kernel time sums the GPU's own events only: an ATen op's self device time holds the kernels it
    launched, which also appear as events of their own, so summing every row counts each kernel twice.
    Host syncs are the CUDA runtime's stream and event synchronizations on a GPU; on the CPU, where none
    exist, the ATen ops that would make one (:data:`SYNC_OPS`).
    """
    def per_step(match) -> float:
        return sum(e.count for e in events if match(e.key)) / n

    device_events = [e for e in events
                     if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    sync_ops = {k: per_step(lambda key, k=k: key == k) for k in SYNC_OPS}
    cuda = device.type == "cuda"
    return {"kernel_launches_per_step": per_step(lambda key: any(s in key for s in LAUNCHES)),
            "kernel_seconds_per_step": sum(e.self_device_time_total for e in device_events) / 1e6 / n,
            "host_syncs_per_step": (per_step(lambda key: key in RUNTIME_SYNCS) if cuda
                                    else sum(sync_ops.values())),
            "host_syncs_counted": "cuda runtime synchronize calls" if cuda else "aten ops that sync a GPU",
            "sync_ops_per_step": {k: v for k, v in sync_ops.items() if v},
            "memcpy_per_step": per_step(lambda key: key.startswith("cudaMemcpy")),
            "profiler_aten_ops_per_step": per_step(lambda key: key.startswith("aten::")),
            "top_ops_by_gpu_time": top_ops(events, "self_device_time_total", n),
            "top_ops_by_cpu_time": top_ops(events, "self_cpu_time_total", n)}


def top_ops(events, key: str, n: int) -> list[dict]:
    """The :data:`TOP_OPS` host-side ops (ATen ops, runtime calls) of largest ``key``, per step."""
    rows = sorted((e for e in events if e.device_type == DeviceType.CPU and getattr(e, key) > 0),
                  key=lambda e: -getattr(e, key))[:TOP_OPS]
    return [{"name": e.key, "calls_per_step": e.count / n, "self_gpu_ms_per_step": e.self_device_time_total / 1e3 / n,
             "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / n} for e in rows]


def worker(s: Setup, sizes: list[int], profile: int) -> None:
    """Double the batch size from ``sizes[0]`` until out of memory (or above ``sizes[1]``); answer with every
    size tried."""
    def handle(msg: dict) -> dict:
        tried = []
        b = sizes[0]
        while b <= sizes[1]:
            res = try_batch(Setup(**{**asdict(s), "batch_size": b}), profile)
            tried.append(res)
            if res["oom"]:
                break
            b *= 2
        return {"sizes": tried, "device": device_name(torch.device(s.device))}

    serve({"ready": True}, handle)


def run_variant(s: Setup, sizes: list[int], peak: float | None, profile: int) -> dict:
    """One variant of one setting in its own process: every batch size tried, the largest that fit, the best
    tokens/s."""
    w = Worker(__file__, ["--worker", json.dumps({"setup": asdict(s), "sizes": sizes, "profile": profile})])
    w.read()
    res = w.request({"cmd": "run"})
    w.close()
    fits = [r for r in res["sizes"] if not r["oom"]]
    for r in fits:
        r["mfu"] = r["flops_per_s"] / peak if peak else None
    return {"sizes": res["sizes"], "largest_batch": max((r["batch_size"] for r in fits), default=0),
            "best_tokens_per_s": max((r["tokens_per_s"] for r in fits), default=0.0)}


def compare(base: Setup, lengths: str, retain: str, sizes: list[int], peak: float | None, profile: int = 0,
            variants: tuple[str, ...] = ("naive", "sequnlearn")) -> dict:
    """The variants of one setting (each in its own process, one after the other), and their ratios."""
    out: dict = {"lengths": lengths, "retain": retain}
    for v in variants:
        out[v] = run_variant(Setup(**{**asdict(base), "variant": v, "lengths": lengths, "retain": retain}), sizes,
                             peak, profile)
    if len(variants) < 2:
        return out
    n, q = out["naive"], out["sequnlearn"]
    out["tokens_per_s_ratio"] = q["best_tokens_per_s"] / n["best_tokens_per_s"] if n["best_tokens_per_s"] else None
    out["largest_batch_ratio"] = q["largest_batch"] / n["largest_batch"] if n["largest_batch"] else None
    both = [(x, y) for x in n["sizes"] for y in q["sizes"]
            if x["batch_size"] == y["batch_size"] and not (x["oom"] or y["oom"])]
    out["by_batch"] = [{"batch_size": x["batch_size"], "tokens_per_s_ratio": y["tokens_per_s"] / x["tokens_per_s"],
                        "memory_ratio": y["peak_memory_mib"] / x["peak_memory_mib"]} for x, y in both]
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
            for s in r.get(v, {}).get("sizes", []):
                if s["oom"]:
                    print(f"{r['lengths']:9s} {r['retain']} {v:10s} batch {s['batch_size']:3d}: out of memory")
                    continue
                mfu = f"{100 * s['mfu']:.1f}%" if s.get("mfu") is not None else "n/a"
                print(f"{r['lengths']:9s} {r['retain']} {v:10s} batch {s['batch_size']:3d}: "
                      f"{s['tokens_per_s']:.0f} tok/s, MFU {mfu}, peak {s['peak_memory_mib']:.0f} MiB{_profiled(s)}")
        ratio, name = r.get("tokens_per_s_ratio"), f"gpu_step {r['lengths']} {r['retain']}"
        if "tokens_per_s_ratio" not in r:
            continue  # one variant only
        if ratio is None:
            print(f"{name}: the naive variant fit no batch size")
            continue
        each = ", ".join(f"{b['batch_size']}: {b['tokens_per_s_ratio']:.2f}x / {b['memory_ratio']:.2f}x"
                         for b in r["by_batch"])
        print(f"{name}: best tokens/s sequnlearn / naive = {ratio:.2f}x, largest batch "
              f"{r['sequnlearn']['largest_batch']} vs {r['naive']['largest_batch']}, losses match {r['loss_match']}; "
              f"tokens/s / memory by batch size: {each}")


def _profiled(size: dict) -> str:
    """The profile's figures of one batch size, for its report line ('' when not profiled)."""
    prof = size.get("profile")
    if not prof:
        return ""
    return (f"; profile: {prof['kernel_launches_per_step']:.0f} launches, GPU busy "
            f"{100 * prof['gpu_busy_share']:.0f}%, {prof['host_syncs_per_step']:.0f} host syncs, "
            f"{prof['profiler_aten_ops_per_step']:.0f} aten ops per step")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=list(SHAPES), default="pythia-1b")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in both variants")
    p.add_argument("--lengths", choices=["realistic", "fixed", "reference", "both"], default="realistic")
    p.add_argument("--retain", choices=["l2", "kl", "both"], default="both")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--max-batch", type=int, default=64, help="largest per-device batch size tried")
    p.add_argument("--min-batch", type=int, default=1, help="first per-device batch size tried (then doubled)")
    p.add_argument("--variants", choices=["both", "naive", "sequnlearn"], default="both",
                   help="one variant alone: no ratios (e.g. an engine setting against another, with --set)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak of this GPU, for MFU (default: by name)")
    p.add_argument("--profile", nargs="?", type=int, const=1, default=0, metavar="STEPS",
                   help="profile STEPS (default 1) more optimizer steps per batch size and variant")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="engine config key for both variants, e.g. --set head_chunk_rows=4096 (repeatable)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: a smoke run of this script (fp32, no kernel figures)")
    p.add_argument("--json", default=str(RESULTS / "gpu_step.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Check for a GPU, measure every requested setting, write the JSON."""
    args = parse_args(argv)
    if args.worker:
        msg = json.loads(args.worker)
        worker(Setup(**msg["setup"]), msg["sizes"], msg["profile"])
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_step.py needs a CUDA GPU and torch.cuda.is_available() is False here; on a CPU run "
              "benchmarks/unlearn_step.py --small instead (or this script with --device cpu, a smoke run)",
              file=sys.stderr)
        raise SystemExit(2)
    if not 1 <= args.min_batch <= args.max_batch:
        print(f"error: --min-batch {args.min_batch} must be at least 1 and at most --max-batch {args.max_batch}",
              file=sys.stderr)
        raise SystemExit(2)
    depth = SHAPES[args.shape]["num_hidden_layers"]
    base = with_overrides(Setup("", args.shape, "", "", depth * 22 // 32, 1, args.max_length, args.max_length // 8,
                                1.0, args.steps, args.warmup, 0, args.device, 0, args.checkpointing), args.set)
    device = torch.device(args.device)
    peak = peak_flops(args.peak_tflops, device)
    settings = [(ln, rt) for ln in (["realistic", "fixed"] if args.lengths == "both" else [args.lengths])
                for rt in (["l2", "kl"] if args.retain == "both" else [args.retain])]
    variants = ("naive", "sequnlearn") if args.variants == "both" else (args.variants,)
    runs = [compare(base, ln, rt, [args.min_batch, args.max_batch], peak, args.profile, variants)
            for ln, rt in settings]
    report(runs)
    from sequnlearn.runs import write_json

    write_json(args.json, {"benchmark": "gpu_step", "shape": args.shape, "config": SHAPES[args.shape],
                           "device": device_name(device), "peak_flops": peak, "setup": asdict(base),
                           "profile_steps": args.profile, "torch": torch.__version__, "runs": runs})
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
