"""What a soup of LoRA adapters records: the base and the adapters (results.json ``lora``, a card
section), and, for ``output.adapter``, the adapter written and its SVD error."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hfsoup.compute.lora_writer import soup_modules, write_adapter
from hfsoup.errors import RecipeError
from hfsoup.io.refs import IngredientIndex


def check_adapter_output(indexes: Sequence[IngredientIndex], *, adapter: bool,
                         rank: int | None) -> None:  # fmt: skip
    """Refuse an adapter output for full-model ingredients, and a rank without one.

    Raises:
        RecipeError: naming the option.
    """
    if rank is not None and not adapter:
        raise RecipeError("rank applies to an adapter output only: add output.adapter",
                          options=["output.rank"])  # fmt: skip
    if adapter and indexes[0].adapter is None:
        raise RecipeError(
            f"an adapter output needs LoRA adapters as ingredients; {indexes[0].ingredient.label} "
            "is a full model",
            options=["output.adapter"],
        )


def default_rank(indexes: Sequence[IngredientIndex]) -> int:
    """The largest rank of any module of any adapter."""
    return max(
        ix.adapter.file.refs[m.a].shape[0] for ix in indexes for m in ix.adapter.modules.values()
    )


def finish_lora(
    folder: Path, indexes: Sequence[IngredientIndex], *, adapter: bool, rank: int | None
) -> tuple[dict[str, Any] | None, str]:
    """For adapter ingredients: write the adapter output if asked; results.json's ``lora``
    block and the card's section (``(None, "")`` for full-model ingredients)."""
    if indexes[0].adapter is None:
        return None, ""
    base = indexes[0].adapter.base.ingredient
    modules, replaced = soup_modules(indexes)
    record: dict[str, Any] = {
        "base": {"repo": base.spec.repo or str(base.spec.path), "sha": base.sha},
        "adapters": [
            {
                "repo": ix.ingredient.label,
                "sha": ix.ingredient.sha,
                "modules": len(ix.adapter.modules),
                "saved_whole": sorted(ix.adapter.replaced),
            }
            for ix in indexes
        ],  # fmt: skip
        "target_tensors": len(modules),
        "output": "adapter" if adapter else "full",
    }
    lines = [
        "## LoRA adapters",
        "",
        f"The ingredients are LoRA adapters of `{record['base']['repo']}` (commit "
        f"`{base.sha or 'local'}`), souped in delta space: each adapter read as the full model "
        "θ₀ + ΔW, ΔW = (lora_alpha / r)·B·A per target module, "
        f"{len(modules)} target tensors, {len(replaced)} tensors saved whole (modules_to_save).",
    ]
    if adapter:
        done = write_adapter(folder, indexes, rank=rank or default_rank(indexes))
        record["output_adapter"] = done.record()
        err = record["output_adapter"]["relative_frobenius_error"]
        lines += [
            "",
            f"Written as one adapter of rank {done.rank} (truncated SVD of the averaged ΔW per "
            f"module); relative Frobenius error ‖ΔW − B·A‖/‖ΔW‖: max {err['max']:.4g}, mean "
            f"{err['mean']:.4g} over {done.record()['modules']} modules.",
        ]
    return record, "\n".join(lines) + "\n"
