"""Layer order and the coefficient ramps of the reference."""

from __future__ import annotations

from sequnlearn.errors import UserError


def layer_order(start: int, end: int, step: int) -> list[int]:
    """Target layers from ``start`` down to ``end`` inclusive (28, 16, 4 → [28, 24, 20, 16]).

    Raises:
        UserError: ``step`` is not positive or ``start < end`` (not back-to-front).
    """
    if step <= 0:
        raise UserError(f"layer_step must be positive (got {step}); layers run from layer_start down to layer_end")
    if start < end:
        raise UserError(f"layer_start {start} < layer_end {end}: unlearning runs back to front; swap them")
    return list(range(start, end - 1, -step))


def progress(step: int, total: int) -> float:
    """Fraction ``p`` of a phase done at optimizer step ``step`` of ``total``: 0 at the first, 1 at the last."""
    return step / (total - 1) if total > 1 else 0.0


def coefficients(p: float, remove_coef: float, retain_coef: float) -> tuple[float, float]:
    """The reference's ramps: forget ``remove_coef·(1 − 0.25p)``, retain ``retain_coef·p``.

    Returns:
        ``(forget_coef, retain_coef)`` at progress ``p`` in [0, 1].
    """
    return remove_coef * (1.0 - 0.25 * p), retain_coef * p
