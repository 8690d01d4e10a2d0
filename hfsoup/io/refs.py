"""What an ingredient's index is made of: tensor references, module layouts, range reads.

The plain records the readers (:mod:`~hfsoup.io.tensors`, :mod:`~hfsoup.io.pickled`,
:mod:`~hfsoup.io.layouts`) fill and the streaming and checking code reads, in one module below
all of them so that none imports another to name a type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from hfsoup.io.hub import Ingredient


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes live in one ingredient."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class TensorPatch(Protocol):
    """What changes an ingredient's tensors as they are read (a LoRA adapter's ΔW)."""

    def apply(
        self, refs: tuple[TensorRef, ...], tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]: ...


@dataclass
class IngredientIndex:
    """Every tensor of one ingredient, plus its config.json."""

    ingredient: Ingredient
    tensors: dict[str, TensorRef]
    config: dict
    pickle: bool = False
    # Set when this ingredient names the reference's labels in another order: head rows are
    # read as ``rows[row_perm]`` for the tensors in ``head_tensors``.
    row_perm: list[int] | None = None
    head_tensors: frozenset[str] = frozenset()
    # The sentence-transformers modules beside the weights (hfsoup.io.layouts), if any.
    layout: Layout | None = None
    # A LoRA adapter read as the full model it stands for (hfsoup.io.adapters.BoundAdapter):
    # ``tensors`` are its base's, and every read of them is passed through ``adapter.apply``.
    adapter: TensorPatch | None = None

    @property
    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


@dataclass(frozen=True)
class Module:
    """One entry of modules.json: its folder (``""`` for the transformers model at the top)
    and its class name (``Pooling``; the module path before it varies between releases)."""

    path: str
    kind: str


@dataclass
class Layout:
    """The sentence-transformers files of one ingredient.

    ``settings`` maps every settings file (top-level ones and each module's ``*.json``) to its
    content; ``weights`` maps a module folder to the index of its weights (headers only);
    ``files`` are the module files a soup copies from its first ingredient (the settings of
    the module folders; the top-level ones travel with the tokenizer files).
    """

    modules: list[Module]
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    weights: dict[str, IngredientIndex] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Fetch:
    """One read: ``[start, end)`` of ``file`` in ingredient number ``slot``, covering ``refs``.

    ``disk``: read from the whole file, downloaded once and checked (see :mod:`hfsoup.io.integrity`).
    """

    slot: int
    index: IngredientIndex
    file: str
    start: int
    end: int
    refs: tuple[TensorRef, ...]
    tag: int = 0
    disk: bool = False

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def brief(value: object, limit: int = 120) -> str:
    """``repr(value)``, cut short: a hostile header may hold megabytes in one field."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def few(names: list[str], n: int = 3, *, quote: bool = True) -> str:
    """The first ``n`` of ``names`` (each :func:`brief` unless not ``quote``), and how many more."""
    shown = ", ".join(brief(x) if quote else x for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")
