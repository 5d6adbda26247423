"""The optimizers of a run: torch's AdamW, or Muon for the hidden matrices with AdamW for the rest.

``optimizer: muon`` follows the reference authors' ``MuonAdamW`` (``unlearn/utils/muon.py``):
``torch.optim.Muon`` (Nesterov momentum ``muon_momentum``, the ``match_rms_adamw`` lr adjustment, so one
``lr`` serves both) for the 2-D matrices inside the decoder blocks, and AdamW with betas (0.9, 0.95) and
eps 1e-8 for every other trained parameter, both with ``weight_decay``. Their split is by shape (2-D with
fewer than 50000 rows, which keeps a vocabulary-sized embedding or head out); ours is by place (a 2-D
matrix of a decoder block), which is the same on a real model and also right on a tiny one whose
vocabulary is small.

The two live in one :class:`MuonWithAdamW`: a real :class:`torch.optim.Optimizer` whose ``param_groups``
are the two parts' groups (setting ``lr`` on them sets it for the parts) and whose ``state`` both parts
share, so its ``state_dict`` is an ordinary one (checkpoints, resume and FSDP's full state dicts work as
for AdamW).
"""

from __future__ import annotations

import re
from typing import Iterable

import torch

from sequnlearn.config import UnlearnConfig
from sequnlearn.errors import UserError

MUON_TORCH = "2.9"
"""The first torch release with ``torch.optim.Muon``."""
ADAMW_BETAS = (0.9, 0.95)
"""AdamW's betas beside Muon (the reference's ``MuonAdamW``; plain ``optimizer: adamw`` keeps torch's default)."""
ADAMW_EPS = 1e-8
_BLOCK = re.compile(r"(^|\.)(layers|h)\.\d+\.")
"""A parameter inside decoder block i: ``….layers.i.…`` (GPT-NeoX, the Llama family) or ``….h.i.…`` (GPT-2)."""

NamedParams = Iterable[tuple[str, torch.nn.Parameter]]


def check_optimizer(cfg: UnlearnConfig) -> None:
    """Refuse ``optimizer: muon`` where the installed torch has no ``torch.optim.Muon``.

    Raises:
        UserError: torch is older than :data:`MUON_TORCH`.
    """
    if cfg.optimizer == "muon" and not hasattr(torch.optim, "Muon"):
        raise UserError(f"optimizer muon needs torch.optim.Muon, which torch {torch.__version__} lacks; install "
                        f"torch >= {MUON_TORCH} or use optimizer adamw")


def is_hidden_matrix(name: str, param: torch.Tensor) -> bool:
    """Whether Muon trains this parameter: a 2-D matrix inside a decoder block (LoRA factors included)."""
    return param.ndim == 2 and _BLOCK.search(name) is not None


def build_optimizer(cfg: UnlearnConfig, named_params: NamedParams) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` asks for over ``named_params`` (the trained parameters with their names).

    ``adamw``: torch's fused AdamW (its step counters stay on the device: the for-each implementation
    reads each with ``.item()``, a host-device synchronisation per tensor on a GPU). ``muon``: a
    :class:`MuonWithAdamW` split by :func:`is_hidden_matrix`.

    Raises:
        UserError: ``muon`` where torch has no Muon (:func:`check_optimizer`).
    """
    named = list(named_params)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW([p for _, p in named], lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    check_optimizer(cfg)
    muon = [p for n, p in named if is_hidden_matrix(n, p)]
    rest = [p for n, p in named if not is_hidden_matrix(n, p)]
    return MuonWithAdamW(muon, rest, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum)


class MuonWithAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` over ``muon`` and fused AdamW over ``rest``, as one optimizer (see the module docstring).

    Args:
        muon: 2-D parameters for Muon (Nesterov, ``match_rms_adamw``).
        rest: the other parameters, for AdamW (betas :data:`ADAMW_BETAS`, eps :data:`ADAMW_EPS`).
    """

    def __init__(self, muon: list, rest: list, *, lr: float, weight_decay: float, momentum: float):
        self.parts: list[torch.optim.Optimizer] = []
        if muon:
            self.parts.append(torch.optim.Muon(muon, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                               nesterov=True, adjust_lr_fn="match_rms_adamw"))
        if rest:
            self.parts.append(torch.optim.AdamW(rest, lr=lr, betas=ADAMW_BETAS, eps=ADAMW_EPS,
                                                weight_decay=weight_decay, fused=True))
        super().__init__([group for part in self.parts for group in part.param_groups], {})
        self._link()

    def _link(self) -> None:
        """Point each part at its slice of this optimizer's groups and at the one shared ``state``."""
        start = 0
        for part in self.parts:
            n = len(part.param_groups)
            part.param_groups, part.state = self.param_groups[start:start + n], self.state
            start += n

    @torch.no_grad()
    def step(self, closure=None):
        """One step of each part."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.parts:
            part.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """Load an ordinary optimizer state dict (as :meth:`state_dict` wrote it), then relink the parts."""
        super().load_state_dict(state_dict)
        self._link()
