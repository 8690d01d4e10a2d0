"""What every soup writes beside its weights: the pinned recipe, the card, results.json."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hfsoup.card import CardInfo, CardRow, render_card
from hfsoup.recipe import Recipe
from hfsoup.tensors import IngredientIndex


def pin_recipe(recipe: Recipe, indexes: Sequence[IngredientIndex]) -> Recipe:
    """The recipe with every revision replaced by the commit SHA that was read."""
    entries = []
    for entry, ix in zip(recipe.ingredients, indexes, strict=True):
        sha = ix.ingredient.sha
        entries.append(entry.model_copy(update={"revision": sha} if sha else {}))
    return recipe.model_copy(update={"ingredients": entries})


def write_card(
    folder: Path,
    recipe: Recipe,
    indexes: Sequence[IngredientIndex],
    weights: Sequence[float],
    sections: Sequence[str] = (),
    model_index: list[dict] | None = None,
) -> None:
    """Render the model card into ``folder/README.md``."""
    from hfsoup import __version__

    rows = [
        CardRow(
            repo=ix.ingredient.spec.repo or ix.ingredient.spec.path.name,
            revision=ix.ingredient.spec.revision,
            sha=ix.ingredient.sha,
            weight=w,
            extra=sweep_hparams(ix),
        )  # fmt: skip
        for ix, w in zip(indexes, weights, strict=True)
    ]
    info = CardInfo(
        recipe=recipe,
        rows=rows,
        config=indexes[0].config,
        licenses=[ix.ingredient.card.get("license") for ix in indexes],
        sections=list(sections),
        model_index=model_index,
        hfsoup_version=__version__,
    )
    (folder / "README.md").write_text(render_card(info), encoding="utf-8")


# Hyperparameters shown in the soup's ingredient table, when an ingredient came from a sweep.
_CARD_HPARAMS = {"learning_rate": "lr", "num_train_epochs": "epochs", "weight_decay": "wd",
                 "label_smoothing_factor": "label smoothing", "seed": "seed"}  # fmt: skip


def sweep_hparams(ix: IngredientIndex) -> dict[str, Any]:
    """The hyperparameters an ``hfsoup sweep`` ingredient records, under short names."""
    from hfsoup.sweep import HPARAMS_FILE

    if HPARAMS_FILE not in ix.ingredient.files:
        return {}
    hp = ix.ingredient.source.read_json(HPARAMS_FILE)
    return {short: hp[key] for key, short in _CARD_HPARAMS.items() if key in hp}


def results_base(recipe: Recipe, indexes: Sequence[IngredientIndex], weights: Sequence[float],
                 timings: dict[str, float], shards: Sequence) -> dict[str, Any]:  # fmt: skip
    """The results.json keys every method shares."""
    from hfsoup import __version__

    return {
        "hfsoup_version": __version__,
        "name": recipe.name,
        "method": recipe.method,
        "ingredients": [
            {
                "repo": ix.ingredient.spec.repo or str(ix.ingredient.spec.path),
                "revision": ix.ingredient.spec.revision,
                "sha": ix.ingredient.sha,
                "weight": w,
                "scores": {},
            }  # fmt: skip
            for ix, w in zip(indexes, weights, strict=True)
        ],
        "output": {"shards": len(shards), "parameters": indexes[0].num_parameters},
        "timings": {k: round(v, 4) for k, v in timings.items()},
    }
