"""The live model: one ``transformers`` model whose weights are set from streamed tensors.

Greedy and learned soups score many weight combinations; they keep one model and overwrite its
parameters in place rather than loading a model per combination.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from hfsoup.compute.placement import Placement, model_class
from hfsoup.errors import IncompatibleIngredientsError


def build_model(config: Mapping, *, placement: Placement | None = None) -> torch.nn.Module:
    """A model of the config's architecture, as ``placement`` says (default: CPU, float32).

    Built normally rather than on the ``meta`` device: non-persistent buffers (position ids,
    rotary frequencies) are made in ``__init__`` and are not in any checkpoint. A placement
    over several devices moves each block to its device (hooks move the activations).

    Raises:
        IncompatibleIngredientsError: the architecture is not one ``transformers`` knows.
    """
    cls, cfg = model_class(config)
    placement = placement or Placement.single("cpu")
    model = cls._from_config(cfg, dtype=placement.score_dtype)
    return placement.place(model).eval()


def checkpoint_names(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under the names its checkpoints use.

    transformers 5 renames some weights in memory (ViT's ``attention.attention.key`` is
    ``attention.k_proj``) and reverts the renaming when saving; the same reversal is applied
    here to the model's own tensors, and names are matched by storage.
    """
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # older transformers: checkpoint names are the module names
        return state
    by_storage = {(t.data_ptr(), t.shape): t for t in state.values()}
    reverted = revert_weight_conversion(model, {k: v.detach() for k, v in state.items()})
    out = {}
    for name, tensor in reverted.items():
        target = by_storage.get((tensor.data_ptr(), tensor.shape))
        if target is None:
            raise IncompatibleIngredientsError(
                f"{type(model).__name__} fuses or splits checkpoint tensors ({name!r}) when "
                "loading; scoring soups of this architecture is not supported yet"
            )
        out[name] = target
    return out


class LiveModel:
    """A model plus a name -> tensor map of the parameters and buffers a checkpoint holds."""

    def __init__(self, model: torch.nn.Module, names: set[str]) -> None:
        self.model = model
        state = checkpoint_names(model)
        missing = sorted(names - state.keys())
        if missing:
            raise IncompatibleIngredientsError(
                f"the model has no parameter named {missing[0]!r} (checkpoint/architecture mismatch)"
            )
        self.targets = {n: state[n] for n in names}

    @torch.no_grad()
    def set(self, name: str, value: torch.Tensor) -> None:
        """Overwrite one parameter (cast to its dtype and device)."""
        self.targets[name].copy_(value)

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of every parameter, for tests that compare states bit for bit."""
        return {n: t.detach().clone() for n, t in self.targets.items()}
