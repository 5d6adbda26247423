"""The tampering attack (:mod:`sequnlearn.tamper.attacks`) and what it found (:mod:`sequnlearn.tamper.result`).

``from sequnlearn.tamper import X`` works for every public name of both; a name is looked up in its module
on first use, so a reader of results (``tamper.result``, as the model card is) never loads the attack.
"""

from __future__ import annotations

import importlib

_RESULT = ("CONTROL_LABELS", "attack_key", "benign_label", "by_model_lr", "interrupted_note", "no_answer_label",
           "planned_keys", "planned_roles", "plot_tamper", "seed_curve", "tamper_curve_rows", "tamper_table",
           "worst_case")
_ATTACK = ("Loader", "TamperInterrupted", "attack", "attack_steps", "chunk_corpus", "chunk_documents", "fine_tune",
           "load_attack_texts", "load_benign_texts", "load_no_answer_texts", "make_chunks", "previous_result", "tamper")
__all__ = [*_ATTACK, *_RESULT]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{'result' if name in _RESULT else 'attacks'}")
    return getattr(module, name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
