"""What every soup writes beside its weights: the pinned recipe, the card, results.json."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hfsoup.compute.distributed import Processes
from hfsoup.compute.layout_writer import write_modules
from hfsoup.compute.placement import Placement
from hfsoup.ingredients import HPARAMS_FILE
from hfsoup.io.tensors import IngredientIndex
from hfsoup.io.writer import ShardWriter, copy_aux_files, write_config
from hfsoup.recipe import Recipe
from hfsoup.report.card import CardInfo, CardRow, render_card


def pin_recipe(recipe: Recipe, indexes: Sequence[IngredientIndex]) -> Recipe:
    """The recipe with every revision replaced by the commit SHA that was read, as the soup
    records it (card, ``hfsoup_recipe.yaml``).

    Without ``output.dir``: a recipe read from a soup never chooses its output (the rebuild
    names one), and the folder it was written to is a path of this machine, which a pushed card
    would publish.
    """
    soup_dir = Path(recipe.output.dir).expanduser().resolve() if recipe.output.dir else None
    entries = []
    for entry, ix in zip(recipe.ingredients, indexes, strict=True):
        sha, path = ix.ingredient.sha, ix.ingredient.spec.path
        update: dict = {"revision": sha} if sha else {}
        if path is not None:
            # Written as a path relative to the soup (a repo-shaped name read from a local
            # folder too): a pushed card names no folder of this machine, and a recipe read
            # from the soup finds the folder again (hfsoup.recipe.load_recipe).
            update = {"repo": local_name(path, soup_dir), "revision": None}
        entries.append(entry.model_copy(update=update))
    output = recipe.output.model_copy(update={"dir": None})
    return recipe.model_copy(update={"ingredients": entries, "output": output})


def local_name(path: Path, soup_dir: Path | None) -> str:
    """How a soup names a local ingredient: a path relative to the soup's folder (``../ft-1``),
    or ``./NAME`` when there is none (no folder known, or another drive)."""
    try:
        rel = Path(os.path.relpath(path, soup_dir)).as_posix() if soup_dir else None
    except ValueError:  # Windows: another drive
        rel = None
    if rel is None:
        rel = path.name
    return rel if rel.startswith(("./", "../")) or rel == ".." else f"./{rel}"


def write_card(
    folder: Path,
    recipe: Recipe,
    indexes: Sequence[IngredientIndex],
    weights: Sequence[float],
    sections: Sequence[str] = (),
    model_index: list[dict] | None = None,
) -> None:
    """Render the model card into ``folder/README.md``."""
    from hfsoup._version import __version__
    from hfsoup.registry import get_method

    # A weight of 0 from a method that rejects ingredients marks one it left out.
    rejects = get_method(recipe.method).rejects

    rows = [
        CardRow(
            repo=ix.ingredient.spec.repo or ix.ingredient.spec.path.name,
            revision=ix.ingredient.spec.revision,
            sha=ix.ingredient.sha,
            weight=w,
            extra=sweep_hparams(ix),
            local=ix.ingredient.spec.path is not None,
            rejected=rejects and w == 0,
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
    if HPARAMS_FILE not in ix.ingredient.files:
        return {}
    hp = ix.ingredient.source.read_json(HPARAMS_FILE)
    return {short: hp[key] for key, short in _CARD_HPARAMS.items() if key in hp}


@dataclass
class Scores:
    """What a scored soup (greedy, learned) adds to results.json: the task, each ingredient's
    scores, the comparison table, the greedy ensemble's members and the selection rule."""

    task: Any
    individual: Sequence[dict]
    table: dict[str, Any]
    ensemble_members: Sequence[str]
    selection: tuple[str, str]


@dataclass
class SoupResults:
    """A soup's results, filled by its method and read by the writers; results.json is
    :meth:`to_dict`.

    Attributes:
        recipe: the pinned recipe (:func:`pin_recipe`).
        indexes: the ingredients read.
        weights: one mixing weight per ingredient (0 for one a method left out).
        timings: wall seconds per phase.
        shards: the output shard plan.
        hardware: :func:`hardware_record` of the run.
        scores: for a scored soup (None for an unscored one).
        record: the method's own block, written under the method's name (``"greedy"``).
        lora: for LoRA adapter ingredients: their base and, for an adapter output, its rank and
            SVD errors (``hfsoup.pipeline``).
    """

    recipe: Recipe
    indexes: Sequence[IngredientIndex]
    weights: Sequence[float]
    timings: dict[str, float]
    shards: Sequence
    hardware: dict[str, Any] = field(default_factory=dict)
    scores: Scores | None = None
    record: dict[str, Any] | None = None
    lora: dict[str, Any] | None = None
    extra: dict[str, Any] | None = None  # top-level keys a method adds (``search``)

    def to_dict(self) -> dict[str, Any]:
        """results.json: the keys every method shares, then the scored keys, then the record."""
        from hfsoup._version import __version__

        recipe, scores = self.recipe, self.scores
        individual = list(scores.individual) if scores else [{} for _ in self.indexes]
        rows = zip(recipe.ingredients, self.indexes, self.weights, individual, strict=True)
        out: dict[str, Any] = {
            "hfsoup_version": __version__,
            "name": recipe.name,
            "method": recipe.method,
            "ingredients": [_ingredient_row(e, ix, w, s) for e, ix, w, s in rows],
            "output": {"shards": len(self.shards), "parameters": self.indexes[0].num_parameters},
            "timings": {k: _rounded(v) for k, v in self.timings.items()},
            "hardware": self.hardware or {},
        }
        if scores is not None:
            out["task"] = scores.task.model_dump(mode="json", by_alias=True)
            out["greedy_ensemble"] = {"members": list(scores.ensemble_members)}
            out["table"] = scores.table
            out["selection"] = {"split": scores.selection[0], "metric": scores.selection[1]}
        if self.record is not None:
            out[recipe.method] = self.record
        if self.lora is not None:
            out["lora"] = self.lora
        out.update(self.extra or {})
        return out


def _ingredient_row(entry: Any, ix: IngredientIndex, weight: float, scores: dict) -> dict:
    spec = ix.ingredient.spec
    return {
        # A local ingredient as the (pinned) recipe names it: relative to the soup.
        "repo": entry.repo if spec.path is not None else spec.repo,
        "revision": spec.revision,
        "sha": ix.ingredient.sha,
        "weight": weight,
        "scores": scores,
    }


def hardware_record(procs: Processes, placement: Placement) -> dict[str, Any]:
    """The hardware a run used: processes, nodes, device kinds and counts, and the placement.

    A collective under ``accelerate launch``: every process must call it at the same point.
    """
    devices = sorted(set(placement.devices.values()))
    return {**procs.hardware(devices), **placement.describe()}


# Phases in the order a run goes through them, as the card lists them.
_PHASES = {"resolve": "resolve ingredients + read headers", "stream": "stream + average + write",
           "load_task": "load and preprocess the task", "score_ingredients": "score each ingredient",
           "uniform_soup": "uniform soup (form + score)", "greedy_soup": "greedy soup (decide + score)",
           "learn": "learn the mixing weights", "write": "write the soup"}  # fmt: skip


def hardware_section(results: dict[str, Any]) -> str:
    """The card's "Hardware and time" section, from results.json's ``hardware`` and ``timings``."""
    hw, timings = results.get("hardware") or {}, results.get("timings") or {}
    devices = ", ".join(f"{d['count']} x {d['name']} ({d['kind']})" for d in hw.get("devices", []))
    lines = [
        "## Hardware and time",
        "",
        f"Ran as {hw.get('processes', 1)} process(es) on {hw.get('nodes', 1)} node(s): "
        f"{devices or 'unknown devices'}; scoring dtype `{hw.get('score_dtype', 'float32')}`"
        + (f", device map `{hw['device_map']}` ({_blocks(hw)})." if hw.get("device_map") else "."),
        "",
        "| phase | wall time (s) |",
        "|---|---|",
    ]
    for key, value in timings.items():
        if isinstance(value, int | float):
            lines.append(f"| {_PHASES.get(key, key)} | {value:.2f} |")
    cache = timings.get("cache")
    if isinstance(cache, dict):
        lines += ["", f"Outputs cache: {cache.get('hits', 0)} ingredient(s) read from it, "
                      f"{cache.get('misses', 0)} looked up and scored."]  # fmt: skip
    return "\n".join(lines)


def _rounded(value: Any) -> Any:
    """A phase's seconds rounded to 4 decimals; a block of counts (``cache``) as it is."""
    return round(value, 4) if isinstance(value, int | float) else value


def _blocks(hw: dict[str, Any]) -> str:
    return ", ".join(f"{n} block(s) on {d}" for d, n in hw.get("blocks_per_device", {}).items())


def write_weights(
    folder: Path,
    indexes: Sequence[IngredientIndex],
    shards: Sequence[Sequence[str]],
    tensors_of: Callable[[Sequence[str]], dict[str, torch.Tensor]],
    dtype: torch.dtype | None,
    *,
    allow_nonfinite: bool = False,
) -> None:
    """Write the soup's shards (``tensors_of(names)`` per shard, on the CPU, output dtypes),
    the index, the config and the first ingredient's tokenizer/processor files.

    Raises:
        NonFiniteWeightsError: a soup tensor holds NaN or Inf and ``allow_nonfinite`` is False.
    """
    writer = ShardWriter(folder, len(shards), allow_nonfinite=allow_nonfinite)
    for i, names in enumerate(shards):
        writer.write(i, tensors_of(names))
    writer.finish()
    write_config(folder, indexes[0].config, dtype)
    copy_aux_files(folder, indexes[0].ingredient)


def write_soup_files(
    folder: Path,
    results: SoupResults,
    *,
    sections: Sequence[str] = (),
    model_index: list[dict] | None = None,
) -> dict[str, Any]:
    """The card (with the hardware and time section last), the pinned recipe and results.json;
    first, a sentence-transformers soup's module folders (:func:`write_modules`, mixed with
    the soup's weights).

    Returns:
        The content of results.json.
    """
    recipe, indexes, weights = results.recipe, results.indexes, results.weights
    data = results.to_dict()
    dtype = getattr(torch, recipe.output.dtype) if recipe.output.dtype else None
    write_modules(folder, indexes, weights, dtype=dtype, allow_nonfinite=recipe.allow_nonfinite)
    sections = [*sections, hardware_section(data)]
    write_card(folder, recipe, indexes, weights, sections=sections, model_index=model_index)
    (folder / "hfsoup_recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    (folder / "results.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return data
