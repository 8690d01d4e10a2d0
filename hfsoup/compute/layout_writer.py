"""Writing a soup's sentence-transformers modules: their settings, and their averaged weights.

The top-level files (modules.json and the settings) are copied with the tokenizer files
(:func:`hfsoup.io.writer.copy_aux_files`); here each module folder gets its settings from the first
ingredient (:func:`hfsoup.check.layouts.check_layouts` made sure they agree) and, when the module has
weights (a Dense head), their weighted average, streamed, checked finite and written like the
model's own weights.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from hfsoup.compute.combine import stream_average
from hfsoup.errors import NonFiniteWeightsError
from hfsoup.io.layouts import MODULE_WEIGHTS
from hfsoup.io.tensors import IngredientIndex, plan_shards
from hfsoup.io.writer import ShardWriter
from hfsoup.units import MAX_SIZE


def write_modules(
    folder: Path,
    indexes: Sequence[IngredientIndex],
    weights: Sequence[float],
    *,
    dtype: torch.dtype | None = None,
    allow_nonfinite: bool = False,
) -> list[str]:
    """Write the module folders of a sentence-transformers soup into ``folder``.

    Module weights are mixed with the soup's own per-ingredient ``weights`` (greedy: the
    accepted ingredients; learned: each ingredient's mean weight); ingredients of weight 0 are
    not read. Nothing is written for a soup of plain transformers models.

    Returns:
        The files written, relative to ``folder``.

    Raises:
        NonFiniteWeightsError: a module tensor of an ingredient, or of the soup, holds NaN or
            Inf (unless ``allow_nonfinite``); the message names the module.
    """
    layout = indexes[0].layout
    if layout is None:
        return []
    written = []
    for name in layout.files:
        (folder / name).parent.mkdir(exist_ok=True)
        shutil.copyfile(indexes[0].ingredient.source.local_file(name), folder / name)
        written.append(name)
    used = [i for i, w in enumerate(weights) if w != 0]
    for module in layout.weights:
        parts = [indexes[i].layout.weights[module] for i in used]
        # One file: sentence-transformers reads a module's weights from one model.safetensors.
        shards = plan_shards(parts[0], max_shard_size=MAX_SIZE, dtype=dtype)
        (folder / module).mkdir(exist_ok=True)
        writer = ShardWriter(folder / module, 1, allow_nonfinite=allow_nonfinite)
        try:
            stream_average(
                parts, [weights[i] for i in used], shards, on_shard=writer.write, dtype=dtype,
                allow_nonfinite=allow_nonfinite,
            )  # fmt: skip
        except NonFiniteWeightsError as exc:
            raise NonFiniteWeightsError(f"module {module}: {exc}") from exc
        written.append(f"{module}/{MODULE_WEIGHTS}")
    return written


__all__ = ["write_modules"]
