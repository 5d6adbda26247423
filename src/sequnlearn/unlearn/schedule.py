"""The coefficient ramps of the reference and the phases' step counts (the learning-rate schedules are
:func:`sequnlearn.training.lr_factor`)."""

from __future__ import annotations


def progress(step: int, total: int) -> float:
    """Fraction ``p`` of a phase done at optimizer step ``step`` of ``total``: 0 at the first, 1 at the last."""
    return step / (total - 1) if total > 1 else 0.0


def coefficients(p: float, remove_coef: float, retain_coef: float, retain_start: float = 0.0) -> tuple[float, float]:
    """The reference's ramps: forget ``remove_coef·(1 − 0.25p)``, retain ``retain_coef·(s + (1 − s)·p)``.

    ``s`` (``retain_start``, ``retain_ramp_start``) is 0 in the reference (retain ``retain_coef·p``,
    exactly) and 0.25 in the reference authors' full-parameter code.

    Returns:
        ``(forget_coef, retain_coef)`` at progress ``p`` in [0, 1].
    """
    return remove_coef * (1.0 - 0.25 * p), retain_coef * (retain_start + (1.0 - retain_start) * p)


def micro_batch_progress(k: int, per_epoch: float) -> float:
    """The reference code's ramp progress at this process's ``k``-th micro-batch of a phase: ``min(1, k / per_epoch)``.

    Args:
        per_epoch: micro-batches per process in one pass over the examples
            (``num_train_examples / (per_device_batch_size × processes)``).
    """
    return min(1.0, k / per_epoch) if per_epoch > 0 else 0.0


def depth_scale(scale: float, first: int, layer: int) -> float:
    """Phase ``layer``'s multiplier by depth: ``1 + (scale − 1)·(first − layer) / max(first, 1)``.

    ``first`` is the first (deepest) target layer, which gets 1×; layer 0 gets ``scale``×. The reference
    authors' formula of ``forget_layer_scale`` and ``deep_layer_step_scale`` (``sequential_unlearn_sft.py``).
    """
    return 1.0 + (scale - 1.0) * (first - layer) / max(first, 1)


def phase_steps(base: int, layers: list[int], scale: float = 1.0) -> list[int]:
    """Optimizer steps of each phase: ``max(1, int(base · depth_scale(scale, layers[0], L)))`` for target layer L
    (``base`` for every phase when ``scale`` is 1)."""
    return [max(1, int(base * depth_scale(scale, layers[0], layer))) for layer in layers]
