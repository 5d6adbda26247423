"""Helpers shared by the unlearning-step benchmarks: model shapes, batches, peak memory, workers.

Each measured variant runs in its own fresh worker process (so the peak memory of one variant
never includes another's). The parent drives the workers step by step and alternates between
them, so a change of machine load hits both variants alike.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch

# GPT-NeoX shapes. ``small`` keeps Pythia-160M's balance of head to body (2.1M head vs 4.7M body
# parameters; Pythia-160M: 38.6M vs 85M) and of logits to layer activations per token, at a size
# a 2-core CPU steps through in seconds.
SHAPES: dict[str, dict[str, int]] = {
    "pythia-160m": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072,
                        vocab_size=50304),
    "small": dict(num_hidden_layers=6, hidden_size=256, num_attention_heads=4, intermediate_size=1024,
                  vocab_size=8192),
    "pythia-1b": dict(num_hidden_layers=16, hidden_size=2048, num_attention_heads=8, intermediate_size=8192,
                      vocab_size=50304),
    "deep-ignorance-6.9b": dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                                intermediate_size=16384, vocab_size=50304),  # the reference's model (6.86B)
    # Pythia-1B's depth and heads at a width a CPU steps through (op_count.py): how many ops a step makes
    # depends on the layers, row groups, head chunks and micro-batches, not on the width or the vocabulary
    "pythia-1b-w64": dict(num_hidden_layers=16, hidden_size=64, num_attention_heads=8, intermediate_size=256,
                          vocab_size=4096),
    "pythia-1b-w128": dict(num_hidden_layers=16, hidden_size=128, num_attention_heads=8, intermediate_size=512,
                           vocab_size=8192),
    # smoke tests of the benchmark scripts (two widths, one depth)
    "tiny": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=256),
    "tiny-w64": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128,
                     vocab_size=512),
}
RESULTS = Path(__file__).parent / "results"
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::is_nonzero", "aten::equal")
"""ATen ops that make the host wait for a GPU (``item``, ``bool``, boolean-mask indexing, ...)."""


def gpt_neox(shape: str, *, dtype: torch.dtype, device: torch.device, max_len: int = 2048,
             seed: int = 0) -> torch.nn.Module:
    """A randomly initialised GPT-NeoX of the named shape (rotary 25%, parallel residual, no dropout).

    Raises:
        ValueError: ``shape`` is not one of :data:`SHAPES`.
    """
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    if shape not in SHAPES:
        raise ValueError(f"shape {shape!r} is unknown; use one of {', '.join(SHAPES)}")
    cfg = GPTNeoXConfig(max_position_embeddings=max(2048, max_len), rotary_pct=0.25,
                        use_parallel_residual=True, hidden_dropout=0.0, attention_dropout=0.0,
                        bos_token_id=0, eos_token_id=0, tie_word_embeddings=False, **SHAPES[shape])
    torch.manual_seed(seed)
    with torch.device(device):  # initialise in place (a 1B model is slow to initialise on a CPU)
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def sequence_lengths(n: int, max_len: int, *, median: int, sigma: float, gen: torch.Generator,
                     min_len: int = 8) -> list[int]:
    """``n`` lognormal document lengths (many short, some long), clipped to ``min_len..max_len``.

    ``sigma <= 0`` gives ``n`` sequences of exactly ``max_len`` tokens (the fixed-length variant).
    """
    if sigma <= 0:
        return [max_len] * n
    raw = torch.empty(n, dtype=torch.float64).log_normal_(math.log(median), sigma, generator=gen)  # (n,)
    return [int(x) for x in raw.round().clamp(min_len, max_len)]


def random_sequences(lengths: list[int], vocab: int, gen: torch.Generator) -> list[list[int]]:
    """Uniformly random token ids (``1..vocab-1``; 0 is the pad id) of the given lengths."""
    return [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in lengths]


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated GPU memory on CUDA, else the peak resident set size of this process."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    """Resident set size of this process now (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def model_dtype(device: torch.device) -> torch.dtype:
    """The benchmarks' model weights: bf16 on a GPU, float32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def device_name(device: torch.device) -> str:
    """The GPU's name, or ``cpu``."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (no-op on the CPU) so wall times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Worker:
    """A benchmark variant in its own Python process, driven one JSON-line request at a time.

    The worker starts with ``script *args`` and answers on stdout (see :func:`serve`); its stderr
    goes to a temporary file that is shown when it fails.
    """

    def __init__(self, script: str | Path, args: list[str]):
        self.log = tempfile.TemporaryFile(mode="w+", encoding="utf-8")
        self.proc = subprocess.Popen([sys.executable, str(script), *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1)

    def read(self) -> dict:
        """The worker's next answer.

        Raises:
            RuntimeError: the worker exited (the tail of its stderr is in the message).
        """
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            self.log.seek(0)
            raise RuntimeError(f"benchmark worker exited with {code}:\n{self.log.read()[-4000:]}")
        return json.loads(line)

    def request(self, msg: dict) -> dict:
        """Send ``msg`` and return the answer."""
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> dict:
        """Ask for the final report (``{"cmd": "done"}``), wait for the exit; returns the report."""
        final = self.request({"cmd": "done"})
        self.proc.wait()
        self.log.close()
        return final


def serve(ready: dict, handle: Callable[[dict], dict]) -> None:
    """Worker side of :class:`Worker`: announce ``ready``, then answer each stdin line with ``handle``.

    Anything the libraries print goes to stderr, so stdout carries only the answers. The loop
    ends after answering ``{"cmd": "done"}``.
    """
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    out.write(json.dumps(ready) + "\n")
    for line in sys.stdin:
        msg = json.loads(line)
        out.write(json.dumps(handle(msg)) + "\n")
        if msg.get("cmd") == "done":
            break


def median(xs: list[float]) -> float:
    """Median of a non-empty list (NaN when empty)."""
    return statistics.median(xs) if xs else math.nan


def load_average() -> float:
    """One-minute load average of the machine (NaN where unknown)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


def mib(n: float) -> float:
    """Bytes → MiB."""
    return n / 2**20
