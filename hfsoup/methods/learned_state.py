"""Resuming an interrupted learned soup: a checkpoint per epoch in the staged output folder.

After each epoch the learned run writes ``learned_state.pt`` (α, β, the Adam state, the
step-order generator, the losses so far, and the run's fingerprint) into the output's
temporary folder, atomically (a temporary file, then ``os.replace``). A rerun of the same
recipe (``--resume``, or simply the same command) finds it there and goes on after that epoch,
so it ends with the α an uninterrupted run ends with. The file is read with
``torch.load(weights_only=True)``; a damaged one, or one of another run (another fingerprint:
ingredients' SHAs, task, learned options, seed, path), is not resumed. The ingredients' outputs
need no checkpoint: they come back from the outputs cache across runs
(:mod:`hfsoup.tasks.output_cache`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from hfsoup.errors import NothingToResumeError
from hfsoup.io.tensors import IngredientIndex
from hfsoup.io.writer import partial_dir
from hfsoup.recipe import Recipe

LEARNED_STATE = "learned_state.pt"

log = logging.getLogger("hfsoup")


def fingerprint(
    recipe: Recipe, indexes: Sequence[IngredientIndex], config: BaseModel, path: str
) -> str:
    """Identifies a learned run (its options ``config`` with their defaults filled in): a
    checkpoint is only resumed by the same run."""
    learned = config.model_dump(mode="json")
    data = {
        "ingredients": [ix.ingredient.sha or str(ix.ingredient.spec.path) for ix in indexes],
        "task": recipe.task.model_dump(mode="json"),
        "learned": learned,
        "seed": recipe.seed,
        "path": path,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _read(folder: Path) -> dict[str, Any] | None:
    try:
        data = torch.load(folder / LEARNED_STATE, weights_only=True)
    except FileNotFoundError:
        return None
    except Exception as err:  # damaged: not resumed, the run starts afresh
        log.info("learned soup: ignoring a damaged checkpoint (%s)", err)
        return None
    return data if isinstance(data, dict) else None


class LearnedState:
    """The checkpoint file of one run in ``folder`` (None: keep nothing)."""

    def __init__(self, folder: Path | None, fingerprint: str) -> None:
        self.folder, self.fingerprint = folder, fingerprint

    def load(self) -> dict[str, Any] | None:
        """The checkpoint of this run, if an interrupted one left it."""
        if self.folder is None:
            return None
        data = _read(self.folder)
        if data is None or data.get("fingerprint") != self.fingerprint:
            return None
        return data["checkpoint"]

    def save(self, checkpoint: dict[str, Any]) -> None:
        """Keep ``checkpoint`` (the end of an epoch), replacing the previous one atomically."""
        if self.folder is None:
            return
        tmp = self.folder / (LEARNED_STATE + ".tmp")
        torch.save({"fingerprint": self.fingerprint, "checkpoint": checkpoint}, tmp)
        os.replace(tmp, self.folder / LEARNED_STATE)


def check_resumable(target: Path, fingerprint: str) -> None:
    """Refuse ``--resume`` when no interrupted learned run of this recipe is in ``target``'s
    staged folder.

    Raises:
        NothingToResumeError: no checkpoint there, or one of another run.
    """
    folder = partial_dir(target.expanduser().resolve())
    data = _read(folder)
    if data is None:
        raise NothingToResumeError(
            f"nothing to resume: no interrupted learned run of {target} (looked in {folder})"
        )
    if data.get("fingerprint") != fingerprint:
        raise NothingToResumeError(
            f"cannot resume: the learned run interrupted in {folder} had other ingredients, "
            "task or options; run without resume to start afresh",
            options=["resume"],
        )
