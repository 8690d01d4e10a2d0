"""Opt-in reading of pickle checkpoints (``pytorch_model.bin``), only with ``weights_only=True``.

Pickle can run arbitrary code when loaded, so hfsoup refuses these files unless the user passes
``--allow-pickle``; even then ``torch.load`` is restricted to tensors and plain containers.
"""

from __future__ import annotations

import re
from functools import lru_cache

import torch

from hfsoup.dtypes import CODE_OF as DTYPE_NAMES
from hfsoup.errors import CorruptWeightsError
from hfsoup.io.hub import Ingredient
from hfsoup.io.refs import TensorRef
from hfsoup.io.refs import brief as _brief
from hfsoup.io.refs import few as _few


@lru_cache(maxsize=2)
def _load(path: str, where: str) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    _check_state(state, where)
    return state


def _kind(value: object) -> str:
    return type(value).__name__


def _check_state(state: object, where: str) -> None:
    """A pickle weight file must hold a non-empty dict of dense tensors under string names.

    Anything else (a training checkpoint that nests the weights, extra values such as a step
    count) is refused, naming what was found, rather than souped without the missing entries.
    """
    if not isinstance(state, dict):
        raise CorruptWeightsError(f"{where}: holds a {_kind(state)}, not a state dict of tensors")
    if not state:
        raise CorruptWeightsError(f"{where}: holds no tensors (an empty state dict)")
    found = [f"{_brief(k)} ({_kind(v)})" for k, v in state.items()
             if not isinstance(k, str) or not isinstance(v, torch.Tensor)]  # fmt: skip
    if len(found) == len(state):
        raise CorruptWeightsError(
            f"{where}: holds no tensors, only {_few(found, quote=False)} (hfsoup reads a plain "
            "state dict of tensor names to tensors, as save_pretrained writes)"
        )
    if found:
        raise CorruptWeightsError(
            f"{where}: holds {len(found)} entries that are not named tensors: "
            f"{_few(found, quote=False)}"
        )
    sparse = [k for k, v in state.items() if v.layout != torch.strided]
    if sparse:
        raise CorruptWeightsError(f"{where}: tensors {_few(sparse)} are not dense tensors")


def load_pickled(ingredient: Ingredient, file: str) -> dict[str, torch.Tensor]:
    """The tensors of one pickle weight file (downloaded whole, memory-mapped).

    Raises:
        CorruptWeightsError: the file holds more than tensors (e.g. a pickle that would call a
            function when loaded) or is not a torch checkpoint; it is never loaded unrestricted.
            Also a file that is not a non-empty dict of named dense tensors.
    """
    try:
        return _load(str(ingredient.source.local_file(file)), f"{ingredient.label}: {file}")
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


def pickle_refs(ingredient: Ingredient, file: str) -> dict[str, TensorRef]:
    """Tensor references for one pickle file; byte offsets are nominal (reads load the file)."""
    refs: dict[str, TensorRef] = {}
    for name, t in load_pickled(ingredient, file).items():
        if t.dtype not in DTYPE_NAMES:
            raise CorruptWeightsError(
                f"{ingredient.label}: {file}: tensor {_brief(name)} has dtype {t.dtype}"
            )
        nbytes = t.numel() * t.element_size()
        refs[name] = TensorRef(name, file, DTYPE_NAMES[t.dtype], tuple(t.shape), 0, nbytes)
    return refs
