"""Full-parameter mode (``method: full``): which decoder blocks train in each phase, and their originals.

In phase k the target block ``layers[k]`` and the ``maintained_layers`` train; every other parameter
has ``requires_grad`` off and never changes (embeddings, final norm and head never train). When a
block's first phase starts its parameters are copied into
:attr:`~sequnlearn.model.layers.Architecture.originals`, and every "adapter off" call of that block runs
with the copy: the original model stays reachable for the forget suffix and the retain loss without a
second model. Only blocks that train are copied (a schedule over every layer ends up copying every
block: as much memory as the decoder's weights once more, none for embeddings and head); a block not
trained yet is its own original.
"""

from __future__ import annotations

import torch
from torch import nn

from sequnlearn.errors import UserError
from sequnlearn.model.layers import Architecture


class Blocks:
    """The trainable decoder blocks of a full-parameter run and their stashed originals.

    Args:
        model: the model (the HF causal LM itself, no adapter).
        arch: its :class:`Architecture` (its ``originals`` are filled here).
        layers: the target layers, one phase each, in order.
        maintained: blocks that train in every phase (``maintained_layers``).

    Raises:
        UserError: a maintained layer is outside the model's depth.
    """

    def __init__(self, model: nn.Module, arch: Architecture, layers: list[int], maintained: list[int] | None):
        n = arch.num_layers
        bad = [i for i in maintained or [] if not 0 <= i < n]
        if bad:
            raise UserError(f"maintained_layers {bad} are outside this model's depth (it has {n} layers: 0..{n - 1}); "
                            "choose layers within it")
        self.arch, self.layers, self.maintained = arch, list(layers), sorted(maintained or [])
        names = {id(p): name for name, p in model.named_parameters()}
        self._named = {i: [(names[id(p)], p) for p in arch.layers[i].parameters()] for i in self.all_blocks()}
        model.requires_grad_(False)

    def trainable(self, phase: int) -> list[int]:
        """The blocks that train in ``phase``: its target layer and the maintained ones."""
        return sorted({self.layers[phase], *self.maintained})

    def all_blocks(self) -> list[int]:
        """Every block that trains in some phase, in layer order."""
        return sorted({*self.layers, *self.maintained})

    def named_parameters(self, blocks: list[int] | None = None) -> list[tuple[str, nn.Parameter]]:
        """``(name in the model, parameter)`` of ``blocks`` (default: :meth:`all_blocks`), in layer order."""
        return [pair for i in sorted(self.all_blocks() if blocks is None else blocks) for pair in self._named[i]]

    def enter(self, phase: int) -> list[nn.Parameter]:
        """Make the blocks of ``phase`` the trainable ones, stashing the originals of those not stashed
        yet (before their first update); returns their parameters."""
        now = self.trainable(phase)
        for i in now:
            self._stash(i)
        for i in self.all_blocks():
            for _, p in self._named[i]:
                p.requires_grad_(i in now)
        return [p for _, p in self.named_parameters(now)]

    def retired(self, phase: int) -> list[nn.Parameter]:
        """Parameters of the blocks that trained before ``phase`` and train in no phase from it on."""
        later = {i for q in range(phase, len(self.layers)) for i in self.trainable(q)}
        return [p for i in sorted(self.arch.originals) if i not in later for _, p in self._named[i]]

    def _stash(self, i: int) -> None:
        if i not in self.arch.originals:
            self.arch.originals[i] = {n: p.detach().clone() for n, p in self.arch.layers[i].named_parameters()}

    def state_dict(self) -> dict[int, dict[str, torch.Tensor]]:
        """The current weights of every block that has started training (on the CPU), by block and name."""
        return {i: {n: p.detach().cpu().clone() for n, p in self.arch.layers[i].named_parameters()}
                for i in sorted(self.arch.originals)}

    def load_state_dict(self, state: dict[int, dict[str, torch.Tensor]]) -> None:
        """Load trained block weights into a model that holds the base weights: each block's original is
        stashed first, so the result is the state :meth:`state_dict` was taken in.

        Raises:
            UserError: a block or weight of ``state`` is not one this run trains.
        """
        for i, weights in state.items():
            params = dict(self.arch.layers[i].named_parameters()) if i in self._named else {}
            if set(params) != set(weights):
                raise UserError(f"--resume: the checkpoint's block {i} is not a block this run trains; delete "
                                "checkpoints/ to start over, or resume with the config it was written with")
            self._stash(i)
            with torch.no_grad():
                for n, t in weights.items():
                    params[n].copy_(t)


def drop_moments(opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """Forget the optimizer state (moments, step counts) of ``params`` (Muon with AdamW shares one ``state``)."""
    for p in params:
        opt.state.pop(p, None)
