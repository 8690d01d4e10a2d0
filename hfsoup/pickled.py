"""Opt-in reading of pickle checkpoints (``pytorch_model.bin``), only with ``weights_only=True``.

Pickle can run arbitrary code when loaded, so hfsoup refuses these files unless the user passes
``--allow-pickle``; even then ``torch.load`` is restricted to tensors and plain containers.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from hfsoup.errors import CorruptWeightsError
from hfsoup.hub import Ingredient
from hfsoup.tensors import DTYPE_NAMES, TensorRef


@lru_cache(maxsize=2)
def _load(path: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CorruptWeightsError(
            f"{path}: cannot be loaded with weights_only=True ({exc})"
        ) from exc
    if not isinstance(state, dict):
        raise CorruptWeightsError(f"{path}: not a state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_pickled(ingredient: Ingredient, file: str) -> dict[str, torch.Tensor]:
    """The tensors of one pickle weight file (downloaded whole, memory-mapped)."""
    return _load(str(ingredient.source.local_file(file)))


def pickle_refs(ingredient: Ingredient, files: list[str]) -> dict[str, TensorRef]:
    """Tensor references for pickle files; byte offsets are nominal (reads load the file)."""
    refs: dict[str, TensorRef] = {}
    for file in files:
        for name, t in load_pickled(ingredient, file).items():
            if t.dtype not in DTYPE_NAMES:
                raise CorruptWeightsError(
                    f"{ingredient.label}: tensor {name!r} has dtype {t.dtype}"
                )
            nbytes = t.numel() * t.element_size()
            refs[name] = TensorRef(name, file, DTYPE_NAMES[t.dtype], tuple(t.shape), 0, nbytes)
    return refs
