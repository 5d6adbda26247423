"""One unlearning step, naive reference pattern vs sequnlearn's engine: time, tokens/s, peak memory.

One step is one micro-batch of forget data and one of retain data, forward, backward, gradient
clip and AdamW step, at target layer L (default: the reference's mean depth 22/32 of the model).
The model is a randomly initialised GPT-NeoX of Pythia-160M's shape (``--small``: 6 layers, hidden
256, vocab 8192, max length 512: the same balance of head to body, minutes on a CPU), fp32 on the
CPU, bf16 on a GPU. On the CPU each worker uses one thread unless ``--threads`` says otherwise: with
other jobs on the cores, two-thread runs slow down several-fold at random moments. Two variants:

* **naive** — the reference pattern, written here: a ``copy.deepcopy`` of the model is the frozen
  original; on forget data the LoRA model runs the full network (a forward hook keeps layer L's
  output), which then goes through the copy's layers L+1..N, norm and head (logits at every
  position); the retain losses come from full forwards of both models; every sequence is padded
  to the maximum length.
* **sequnlearn** — ``Unlearner.optimizer_step`` on the same batches.

Both see the same seeded batches (``realistic``: lognormal document lengths, median max_len/8,
sigma 1, i.e. many short documents and some long ones; ``fixed``: every sequence at max length),
the same LoRA weights (LoRA dropout off), the same random targets and coefficients, for the L2 and
the KL retain loss. Each variant runs in its own fresh process, so peak memory (peak RSS on the
CPU, peak allocated on a GPU) is that variant's alone; the parent runs the two processes step by
step in turn, so a change of machine load hits both alike. The time ratio is the median over
measured steps of sequnlearn's time / naive's time on the same batch. Losses of every step must
agree within float tolerance, or the ratios do not count.

    python benchmarks/unlearn_step.py --small                # a few minutes on a CPU
    python benchmarks/unlearn_step.py --small --threads 0    # torch's thread count (all cores)
    python benchmarks/unlearn_step.py --steps 5 --json /tmp/step.json
    python benchmarks/unlearn_step.py --small --set row_group_tokens=8192 --set pad_multiple=64   # GPU settings
    PYTHONPATH=/tmp/old/src python benchmarks/unlearn_step.py --small   # another engine version

Prints a line per setting and one summary line per ratio; writes JSON to
``benchmarks/results/unlearn_step.json`` (or ``--json``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _common import (RESULTS, SHAPES, Worker, current_rss_bytes, gpt_neox, load_average, median, mib,  # noqa: E402
                     model_dtype, peak_memory_bytes, random_sequences, sequence_lengths, serve, synchronize)

if TYPE_CHECKING:
    from sequnlearn.config import UnlearnConfig

TIME_TARGET, MEMORY_TARGET, FIXED_TARGET = 0.5, 0.6, 1.0
PAD = 0
LORA_B_STD = 0.02  # LoRA B starts at zero; a non-zero adapter makes the retain losses non-trivial
Batch = tuple[list[list[int]], list[list[int]]]  # (forget sequences, retain sequences)


@dataclass
class Setup:
    """What one worker measures (also the JSON it receives on the command line)."""

    variant: str
    shape: str
    lengths: str
    retain: str
    layer: int
    batch_size: int
    max_len: int
    median_len: int
    sigma: float
    steps: int
    warmup: int
    seed: int
    device: str
    threads: int
    checkpointing: bool = False
    overrides: dict = field(default_factory=dict)
    """Engine config keys (``--set KEY=VALUE``) over :func:`unlearn_config`'s, for both variants: the naive one
    takes its coefficients, optimizer settings and ``mixed_precision`` from the same config."""


# ---------------------------------------------------------------------- data and model


def make_batches(s: Setup) -> list[Batch]:
    """The seeded (forget, retain) micro-batches of all warm-up and measured steps."""
    gen = torch.Generator().manual_seed(s.seed)
    # realistic: lognormal lengths; fixed: every row max_len; reference: forget rows of max_len (the
    # reference's forget documents are all longer), retain lognormal
    sigmas = {"realistic": (s.sigma, s.sigma), "fixed": (0.0, 0.0), "reference": (0.0, s.sigma)}[s.lengths]
    vocab = SHAPES[s.shape]["vocab_size"]
    out = []
    for _ in range(s.warmup + s.steps):
        pair = [random_sequences(sequence_lengths(s.batch_size, s.max_len, median=s.median_len, sigma=sigma,
                                                  gen=gen), vocab, gen) for sigma in sigmas]
        out.append((pair[0], pair[1]))
    return out


def pad_to(seqs: list[list[int]], length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad every sequence to ``length`` (the reference's padding): ids and mask ``(B, length)``."""
    ids = torch.full((len(seqs), length), PAD, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def target_generator(seed: int, step: int) -> torch.Generator:
    """The random-target generator of step ``step``, handed to both variants."""
    return torch.Generator().manual_seed(seed * 1_000_003 + 17 + step)


def perturb_lora(model: torch.nn.Module, seed: int) -> None:
    """Seeded non-zero LoRA B matrices (the same in both variants: same names, same order)."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * LORA_B_STD)


def unlearn_config(s: Setup) -> UnlearnConfig:
    """The engine config of this setup (no LoRA dropout, so both variants are deterministic), with its overrides.

    Raises:
        UserError: an override names an unknown key or gives a bad value.
    """
    from sequnlearn.config import UnlearnConfig, build

    n = s.batch_size * (s.warmup + s.steps)
    return build(UnlearnConfig, dict(model="benchmark", layers=[s.layer], retain_loss=s.retain, lora_dropout=0.0,
                                     per_device_batch_size=s.batch_size, global_batch_size=s.batch_size,
                                     num_train_examples=n, max_length=s.max_len, seed=s.seed,
                                     gradient_checkpointing=s.checkpointing, **s.overrides))


def with_overrides(s: Setup, items: list[str]) -> Setup:
    """``s`` with the ``--set KEY=VALUE`` options (values read as YAML) added to its engine config overrides.

    Stops with a one-line message (exit status 2) when an option is not ``KEY=VALUE`` or the config it
    makes is not valid (unknown key, bad value), before any worker starts.
    """
    from sequnlearn.config import parse_override
    from sequnlearn.errors import UserError

    try:
        out = replace(s, overrides={**s.overrides, **dict(parse_override(i) for i in items)})
        unlearn_config(replace(out, retain=out.retain or "l2"))  # the base setup has no retain loss yet
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return out


# ---------------------------------------------------------------------- the two variants


class Naive:
    """The reference pattern: deep-copied original, full forwards, padding to max length."""

    def __init__(self, model: torch.nn.Module, s: Setup, device: torch.device):
        from sequnlearn.distributed import Process
        from sequnlearn.model import adapter as lora
        from sequnlearn.model.layers import architecture

        self.s, self.device, self.cfg = s, device, unlearn_config(s)
        self.original = copy.deepcopy(model).requires_grad_(False).eval()
        torch.manual_seed(s.seed)  # the engine seeds the same way before it adds the adapter
        self.model = lora.add_lora(model, r=self.cfg.lora_r, alpha=self.cfg.lora_alpha, dropout=0.0,
                                   target_modules=self.cfg.target_modules).eval()
        if s.checkpointing:  # HF recomputes layers in backward in train mode (no dropout here: all 0)
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.train()
        perturb_lora(self.model, s.seed)
        self.cur_arch, self.orig_arch = architecture(self.model), architecture(self.original)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.autocast = Process(device=device).autocast  # the engine's mixed precision (auto: bf16 on a GPU only)

    def forget_loss(self, ids: torch.Tensor, mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Full LoRA forward (hook at layer L) → the copy's layers L+1..N, norm, head at every position."""
        from sequnlearn.model.layers import run_layers

        kept: dict[str, torch.Tensor] = {}

        def hook(_module, _inputs, out):
            kept["h"] = out[0] if isinstance(out, tuple) else out

        handle = self.cur_arch.layers[self.s.layer].register_forward_hook(hook)
        try:
            self.model(input_ids=ids, attention_mask=mask, use_cache=False)
        finally:
            handle.remove()
        ctx = self.orig_arch.context(ids, mask)
        h = run_layers(self.orig_arch, kept["h"], ctx, self.s.layer + 1, self.orig_arch.num_layers)  # (B, T, D)
        logits = self.orig_arch.logits(h)[mask.bool()]  # (B, T, V) → (N, V)
        targets = torch.randint(logits.shape[-1], (logits.shape[0],), generator=gen).to(logits.device)  # (N,)
        return F.cross_entropy(logits.float(), targets) / math.log(logits.shape[-1])

    def retain_loss(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Full forwards of the copy (no grad) and the LoRA model; L2 of layer outputs or KL of logits."""
        real = mask.bool()
        with torch.no_grad():
            orig_h, orig_out = _forward_capturing(self.original, self.orig_arch.layers, ids, mask)
        cur_h, cur_out = _forward_capturing(self.model, self.cur_arch.layers, ids, mask)
        if self.s.retain == "kl":
            logp_c = F.log_softmax(cur_out.logits[real].float(), dim=-1)  # (N, V)
            logp_o = F.log_softmax(orig_out.logits[real].float(), dim=-1)  # (N, V)
            return F.kl_div(logp_c, logp_o, reduction="batchmean", log_target=True)
        per_layer = [(c[real].float() - o[real].float()).norm(dim=-1).mean() for c, o in zip(cur_h, orig_h)]
        return torch.stack(per_layer).mean()

    def step(self, i: int, batch: Batch) -> dict:
        """One optimizer step on ``batch`` with the engine's coefficients and random-target generator."""
        from sequnlearn.unlearn.schedule import coefficients, progress

        fc, rc = coefficients(progress(i, self.s.warmup + self.s.steps), self.cfg.remove_coef, self.cfg.retain_coef)
        fb, rb = (pad_to(seqs, self.s.max_len, self.device) for seqs in batch)
        with self.autocast(self.cfg.mixed_precision):
            f = self.forget_loss(*fb, target_generator(self.s.seed, i))
            r = self.retain_loss(*rb)
        (fc * f + rc * r).backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return {"forget_loss": f.item(), "retain_loss": r.item(), "grad_norm": float(norm)}


def _forward_capturing(model: torch.nn.Module, layers: torch.nn.ModuleList, ids: torch.Tensor,
                       mask: torch.Tensor) -> tuple[list[torch.Tensor], object]:
    """A full HF forward that also returns every decoder layer's output ``(B, T, D)`` (forward hooks)."""
    outs: list[torch.Tensor] = []
    handles = [layer.register_forward_hook(lambda _m, _i, o: outs.append(o[0] if isinstance(o, tuple) else o))
               for layer in layers]
    try:
        return outs, model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()


def engine_runner(model: torch.nn.Module, s: Setup, batches: list[Batch],
                  device: torch.device) -> Callable[[int, Batch], dict]:
    """sequnlearn's ``Unlearner`` on the same batches; returns ``step(i, batch)``.

    Two instance attributes are replaced so that both variants see the same inputs: the engine's
    shuffled micro-batch order (by the step's batch) and its random-target generator (by the
    naive's). ``optimizer_step`` itself, with the losses, backward, clip and AdamW, runs unchanged.
    """
    from sequnlearn.distributed import Process
    from sequnlearn.runs import RunDir
    from sequnlearn.unlearn.engine import Batches, Unlearner

    proc = Process(device=device)  # mixed_precision auto: bf16 autocast on a GPU, none on the CPU
    data = Batches([q for f, _ in batches for q in f], [q for _, r in batches for q in r], PAD)
    torch.manual_seed(s.seed)
    run = RunDir(Path(tempfile.gettempdir()) / "unused")  # optimizer_step writes nothing there
    engine = Unlearner(unlearn_config(s), model, None, data, run, proc)
    perturb_lora(engine.model, s.seed)
    pending: list[tuple[torch.Generator, Batch]] = []
    forget_loss = engine.objective.forget_loss

    def micro_batches(phase: int, step: int):  # this step's batch instead of the engine's shuffled order
        f, r = pending[-1][1]
        yield 0, engine._host_batch(f), engine._host_batch(r)

    def same_targets(batch: dict, layer: int, gen: torch.Generator) -> torch.Tensor:
        return forget_loss(batch, layer, pending[-1][0])  # the naive's generator (one per step)

    engine._micro_batches, engine.objective.forget_loss = micro_batches, same_targets

    def step(i: int, batch: Batch) -> dict:
        pending[:] = [(target_generator(s.seed, i), batch)]
        line = engine.optimizer_step(0, s.layer)
        engine.pos.phase_step += 1
        engine.pos.step += 1
        return line

    return step


# ---------------------------------------------------------------------- worker


def worker(s: Setup) -> None:
    """Build the model and one variant, then run the steps the parent asks for (see ``_common.serve``)."""
    device = torch.device(s.device)
    if s.threads and device.type == "cpu":
        torch.set_num_threads(s.threads)
    batches = make_batches(s)
    model = gpt_neox(s.shape, dtype=model_dtype(device), device=device, max_len=s.max_len)
    model_rss = current_rss_bytes()
    step = Naive(model, s, device).step if s.variant == "naive" else engine_runner(model, s, batches, device)

    def handle(msg: dict) -> dict:
        if msg["cmd"] == "done":
            return {"peak_memory_bytes": peak_memory_bytes(device), "rss_after_model_bytes": model_rss,
                    "threads": torch.get_num_threads()}
        i = msg["step"]
        synchronize(device)
        wall, cpu = time.perf_counter(), time.process_time()
        line = step(i, batches[i])
        synchronize(device)
        return {"seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu,
                "real_tokens": sum(len(q) for part in batches[i] for q in part), "load_average": load_average(),
                "forget_loss": line["forget_loss"], "retain_loss": line["retain_loss"], "grad_norm": line["grad_norm"]}

    serve({"ready": True}, handle)


# ---------------------------------------------------------------------- parent


def summarize(steps: list[dict], final: dict, warmup: int) -> dict:
    """Median seconds per step, real tokens/s and peak memory of one variant's measured steps."""
    rows = steps[warmup:]
    sec = median([r["seconds"] for r in rows])
    tokens = sum(r["real_tokens"] for r in rows) / len(rows)
    return {"seconds_per_step": sec, "cpu_seconds_per_step": median([r["cpu_seconds"] for r in rows]),
            "all_seconds": [r["seconds"] for r in rows], "real_tokens_per_step": tokens, "tokens_per_s": tokens / sec,
            "peak_memory_mib": mib(final["peak_memory_bytes"]),
            "rss_after_model_mib": mib(final["rss_after_model_bytes"])}


def compare_losses(a: list[dict], b: list[dict], rtol: float, atol: float) -> dict:
    """Forget/retain losses (and grad norms, reported only) of every step of two variants."""
    diffs: dict[str, float] = {}
    ok = True
    for key in ("forget_loss", "retain_loss", "grad_norm"):
        for x, y in zip((r[key] for r in a), (r[key] for r in b)):
            d = abs(x - y)
            diffs[key] = max(diffs.get(key, 0.0), d / max(abs(y), 1e-12))
            if key != "grad_norm" and not (math.isfinite(x) and d <= atol + rtol * abs(y)):
                ok = False
    return {"loss_match": ok, "max_rel_diff": diffs,
            "first_step": {v: {k: rows[0][k] for k in ("forget_loss", "retain_loss")}
                           for v, rows in (("naive", b), ("sequnlearn", a))}}


def measure(base: Setup, lengths: str, retain: str, rtol: float, atol: float) -> dict:
    """Both variants of one (lengths, retain loss) setting, in lockstep, each in its own process."""
    workers = {v: Worker(__file__, ["--worker", json.dumps(asdict(Setup(**{**asdict(base), "variant": v,
                                                                          "lengths": lengths, "retain": retain})))])
               for v in ("naive", "sequnlearn")}
    for w in workers.values():
        w.read()  # ready
    steps: dict[str, list[dict]] = {"naive": [], "sequnlearn": []}
    for i in range(base.warmup + base.steps):
        for v in (("naive", "sequnlearn") if i % 2 == 0 else ("sequnlearn", "naive")):
            steps[v].append(workers[v].request({"cmd": "step", "step": i}))
    final = {v: w.close() for v, w in workers.items()}
    naive, seq = (summarize(steps[v], final[v], base.warmup) for v in ("naive", "sequnlearn"))
    measured = zip(steps["naive"][base.warmup:], steps["sequnlearn"][base.warmup:])
    paired = [q["seconds"] / n["seconds"] for n, q in measured]
    return {"lengths": lengths, "retain": retain, "naive": naive, "sequnlearn": seq,
            "time_ratio": median(paired), "time_ratio_of_medians": seq["seconds_per_step"] / naive["seconds_per_step"],
            "paired_time_ratios": paired, "memory_ratio": seq["peak_memory_mib"] / naive["peak_memory_mib"],
            "load_average": median([r["load_average"] for r in steps["naive"]]),
            **compare_losses(steps["sequnlearn"], steps["naive"], rtol, atol)}


def report(runs: list[dict]) -> dict:
    """Print a line per setting and the headline ratios; returns the headline dict."""
    for r in runs:
        n, q = r["naive"], r["sequnlearn"]
        print(f"{r['lengths']:9s} {r['retain']}: naive {n['seconds_per_step']:.2f} s/step "
              f"{n['tokens_per_s']:.0f} tok/s {n['peak_memory_mib']:.0f} MiB | sequnlearn "
              f"{q['seconds_per_step']:.2f} s/step {q['tokens_per_s']:.0f} tok/s {q['peak_memory_mib']:.0f} MiB | "
              f"time {r['time_ratio']:.3f}x memory {r['memory_ratio']:.3f}x | losses match {r['loss_match']} "
              f"(max rel diff forget {r['max_rel_diff']['forget_loss']:.1e}, "
              f"retain {r['max_rel_diff']['retain_loss']:.1e})")
    real = [r for r in runs if r["lengths"] == "realistic"] or runs
    fixed = [r for r in runs if r["lengths"] == "fixed"]
    head = {"time_ratio": max(r["time_ratio"] for r in real), "memory_ratio": max(r["memory_ratio"] for r in real),
            "fixed_time_ratio": max((r["time_ratio"] for r in fixed), default=None),
            "fixed_memory_ratio": max((r["memory_ratio"] for r in fixed), default=None),
            "loss_match": all(r["loss_match"] for r in runs)}
    lines = [("time_ratio", TIME_TARGET, "realistic lengths, worst of the retain losses"),
             ("memory_ratio", MEMORY_TARGET, "peak memory, realistic lengths, worst"),
             ("fixed_time_ratio", FIXED_TARGET, "every sequence at max length, worst")]
    for key, target, what in lines:
        if head[key] is not None:
            verdict = "ok" if head[key] <= target else "MISSED"
            print(f"unlearn_step {key} = {head[key]:.3f} (sequnlearn / naive; target <= {target}; {what}): {verdict}")
    print(f"unlearn_step loss_match = {str(head['loss_match']).lower()} (forget and retain losses of every step)")
    return head


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true",
                   help="6 layers, hidden 256, vocab 8192, max length 512 (minutes on a CPU)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per forget (and retain) micro-batch")
    p.add_argument("--max-length", type=int, help="max tokens per sequence (default 2048; 512 with --small)")
    p.add_argument("--median-length", type=int, help="median of the realistic length mix (default max/8)")
    p.add_argument("--sigma", type=float, default=1.0, help="log-space spread of the realistic length mix")
    p.add_argument("--layer", type=int, help="target layer (default: 22/32 of the depth, the reference's mean)")
    p.add_argument("--lengths", choices=["realistic", "fixed", "reference", "both"], default="both")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in both variants")
    p.add_argument("--retain", choices=["l2", "kl", "both"], default="both")
    p.add_argument("--steps", type=int, default=3, help="measured steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker on the CPU; 0: torch's choice")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="engine config key for both variants, e.g. --set row_group_tokens=8192 (repeatable)")
    p.add_argument("--json", default=str(RESULTS / "unlearn_step.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Measure every requested setting and write the JSON."""
    args = parse_args(argv)
    if args.worker:
        worker(Setup(**json.loads(args.worker)))
        return
    shape = "small" if args.small else "pythia-160m"
    max_len = args.max_length or (512 if args.small else 2048)
    depth = SHAPES[shape]["num_hidden_layers"]
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    layer = args.layer if args.layer is not None else depth * 22 // 32
    base = with_overrides(Setup("", shape, "", "", layer, args.batch_size, max_len, args.median_length or max_len // 8,
                                args.sigma, args.steps, args.warmup, args.seed, device, args.threads,
                                args.checkpointing), args.set)
    half = device != "cpu" or base.overrides.get("mixed_precision") in ("bf16", "fp16")
    rtol, atol = (3e-2, 1e-3) if half else (1e-4, 1e-6)  # bf16 vs fp32
    both = {"lengths": ["realistic", "fixed"], "retain": ["l2", "kl"]}
    settings = [(ln, rt) for ln in (both["lengths"] if args.lengths == "both" else [args.lengths])
                for rt in (both["retain"] if args.retain == "both" else [args.retain])]
    load_before = load_average()
    runs = [measure(base, ln, rt, rtol, atol) for ln, rt in settings]
    head = report(runs)
    import sequnlearn
    from sequnlearn.runs import write_json

    write_json(args.json, {"benchmark": "unlearn_step", **head, "targets": {
        "time_ratio": TIME_TARGET, "memory_ratio": MEMORY_TARGET, "fixed_time_ratio": FIXED_TARGET},
        "setup": {**asdict(base), "config": SHAPES[shape], "rtol": rtol, "atol": atol,
                  "torch": torch.__version__, "sequnlearn": str(Path(sequnlearn.__file__).parent)},
        "load_average": {"before": load_before, "after": load_average()}, "runs": runs})
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
