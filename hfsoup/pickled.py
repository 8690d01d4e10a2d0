"""Opt-in reading of pickle checkpoints (``pytorch_model.bin``), only with ``weights_only=True``.

Pickle can run arbitrary code when loaded, so hfsoup refuses these files unless the user passes
``--allow-pickle``; even then ``torch.load`` is restricted to tensors and plain containers.
"""

from __future__ import annotations

import re
from functools import lru_cache

import torch

from hfsoup.errors import CorruptWeightsError
from hfsoup.hub import Ingredient
from hfsoup.tensors import DTYPE_NAMES, TensorRef


@lru_cache(maxsize=2)
def _load(path: str) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(state, dict):
        raise CorruptWeightsError(f"{path}: not a state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_pickled(ingredient: Ingredient, file: str) -> dict[str, torch.Tensor]:
    """The tensors of one pickle weight file (downloaded whole, memory-mapped).

    Raises:
        CorruptWeightsError: the file holds more than tensors (e.g. a pickle that would call a
            function when loaded) or is not a torch checkpoint; it is never loaded unrestricted.
    """
    try:
        return _load(str(ingredient.source.local_file(file)))
    except CorruptWeightsError:
        raise
    except Exception as exc:
        # torch's message is a page of advice ending in "use weights_only=False": keep only
        # what the file tried to do.
        found = re.search(r"Unsupported [^\n.]*", str(exc))
        reason = found.group(0).strip() if found else type(exc).__name__
        raise CorruptWeightsError(
            f"{ingredient.label}: {file} cannot be loaded with torch.load(weights_only=True) "
            f"({reason}); refused: a pickle that holds more than tensors can run code"
        ) from exc


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
