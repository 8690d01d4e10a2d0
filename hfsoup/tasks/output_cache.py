"""A cache of per-ingredient outputs across runs, beside the HF cache.

Scoring the ingredients is the largest part of a greedy or learned run, and of ``hfsoup
evaluate``. An ingredient's outputs (classification logits per split) depend only on its
weights, the task's data and preprocessing, the scoring dtype and hfsoup's own code, so they are
kept on disk under a key made of exactly those (:func:`entry_key`):

- the ingredient: its pinned commit SHA (a Hub repo), or the sha256 of the files of a local
  folder (its weights and config), with the label reordering applied to its head, if any;
- the task: its recipe mapping (dataset, pinned revision or data files, columns, splits,
  metrics, max length) and the sha256 of every prepared tensor of every split (token ids,
  attention masks, pixel values, labels): whatever the tokenizer, its files, the truncation or
  the data files did, it is in those bytes;
- the scoring dtype (``--score-dtype``) and hfsoup's version.

An entry is one safetensors file ``<root>/<sha256 of the key>.safetensors`` holding one tensor
per split and the key itself in its metadata. ``root`` is ``$HFSOUP_OUTPUTS_CACHE`` when set,
else ``$HF_HOME/hfsoup/outputs`` (``~/.cache/huggingface/hfsoup/outputs``). Writes go to a
temporary file renamed into place (``os.replace``), so a reader never sees half an entry. An
entry is trusted only when it loads, its metadata repeats the key, and each split's tensor is
float32 with one row per example of that split (and the width of the other entries); anything
else is a miss, and the entry is rewritten after scoring. Nothing here contacts the Hub, so
``HF_HUB_OFFLINE`` changes nothing. Under ``accelerate launch`` the cache is not used (every
process must take the same hit or miss).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hfsoup._version import __version__

log = logging.getLogger("hfsoup")

ENV_ROOT = "HFSOUP_OUTPUTS_CACHE"
_SUFFIX = ".safetensors"
_CHUNK = 1 << 20


def default_root() -> Path:
    """``$HFSOUP_OUTPUTS_CACHE``, else ``$HF_HOME/hfsoup/outputs``."""
    override = os.environ.get(ENV_ROOT)
    if override:
        return Path(override).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "hfsoup" / "outputs"


def ingredient_key(index: Any) -> str:
    """What identifies an ingredient's weights: ``sha:<commit>`` for a pinned Hub repo, else
    ``files:<sha256>`` over a local folder's files (names and bytes); the head's label
    reordering is appended when there is one."""
    ingredient = index.ingredient
    if ingredient.sha:
        key = f"sha:{ingredient.sha}"
    else:
        key = f"files:{_folder_digest(Path(ingredient.spec.path), sorted(ingredient.files))}"
    if index.row_perm is not None:
        key += f"|rows:{','.join(map(str, index.row_perm))}"
    return key


def _folder_digest(folder: Path, names: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode() + b"\0")
        with open(folder / name, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def task_fingerprint(scorer: Any) -> str:
    """The sha256 of the scorer's task mapping and of every prepared tensor of its splits."""
    digest = hashlib.sha256()
    digest.update(json.dumps(scorer.task.model_dump(mode="json"), sort_keys=True).encode())
    for name, prepared in scorer.splits.items():
        digest.update(f"\0split:{name}".encode())
        for batch in prepared.batches:
            for column in sorted(batch):
                _hash_tensor(digest, column, batch[column])
        _hash_tensor(digest, "labels", prepared.labels)
    return digest.hexdigest()


def _hash_tensor(digest: Any, name: str, tensor: torch.Tensor) -> None:
    t = tensor.detach().cpu().contiguous()
    digest.update(f"\0{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
    digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def entry_key(ingredient: str, task: str, score_dtype: torch.dtype, kind: str) -> str:
    """The full key of one entry, as JSON (stored in the entry and hashed into its name)."""
    data = {
        "ingredient": ingredient,
        "task": task,
        "kind": kind,
        "score_dtype": str(score_dtype).removeprefix("torch."),
        "hfsoup": __version__,
    }
    return json.dumps(data, sort_keys=True)


class OutputsCache:
    """Entries of per-ingredient outputs in ``root``; counts its hits and misses.

    Args:
        root: the folder (default :func:`default_root`).
        enabled: False reads and writes nothing (``--no-cache``); every lookup is then a miss
            that is not counted.
    """

    def __init__(self, root: Path | None = None, *, enabled: bool = True) -> None:
        self.root = root if root is not None else default_root()
        self.enabled = enabled
        self.hits = 0
        self.misses = 0
        self._fingerprints: dict[int, str] = {}

    def fingerprint(self, scorer: Any) -> str:
        """:func:`task_fingerprint` of ``scorer``, computed once per scorer."""
        if id(scorer) not in self._fingerprints:
            self._fingerprints[id(scorer)] = task_fingerprint(scorer)
        return self._fingerprints[id(scorer)]

    def key(self, scorer: Any, index: Any, score_dtype: torch.dtype) -> str:
        """The key of ``index``'s outputs on ``scorer``'s task at ``score_dtype``."""
        kind = getattr(scorer.task, "kind", "classification")
        return entry_key(ingredient_key(index), self.fingerprint(scorer), score_dtype, kind)

    def path(self, key: str) -> Path:
        return self.root / (hashlib.sha256(key.encode()).hexdigest() + _SUFFIX)

    def read(self, key: str, sizes: dict[str, int]) -> dict[str, torch.Tensor] | None:
        """The outputs per split stored under ``key``, or None (a miss) when there is no entry
        or it cannot be trusted: ``sizes`` is the number of examples of each split."""
        if not self.enabled:
            return None
        found = self._read(key, sizes)
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    def _read(self, key: str, sizes: dict[str, int]) -> dict[str, torch.Tensor] | None:
        from safetensors import safe_open

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") != key or set(f.keys()) != set(sizes):
                    raise ValueError("another key or other splits")
                # Copied out of the file's mapping: nothing later written there can change them.
                outputs = {split: f.get_tensor(split).clone() for split in sizes}
        except Exception as err:  # any damage: a miss, rewritten after scoring
            log.info("outputs cache: ignoring damaged entry %s (%s)", path.name, err)
            return None
        widths = {t.shape[-1] for t in outputs.values() if t.dim() == 2}
        for split, t in outputs.items():
            if t.dtype != torch.float32 or t.dim() != 2 or len(t) != sizes[split]:
                log.info("outputs cache: ignoring entry %s (wrong shape for %s)", path.name, split)
                return None
        if len(widths) > 1:
            log.info("outputs cache: ignoring entry %s (splits of different widths)", path.name)
            return None
        return outputs

    def write(self, key: str, outputs: dict[str, torch.Tensor]) -> None:
        """Write ``outputs`` under ``key`` atomically; a failure to write is only a notice."""
        if not self.enabled:
            return
        from safetensors.torch import save_file

        path = self.path(key)
        tensors = {s: t.detach().to("cpu", torch.float32).contiguous() for s, t in outputs.items()}
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=_SUFFIX)
            os.close(fd)
            try:
                save_file(tensors, tmp, metadata={"key": key})
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError as err:
            log.info("outputs cache: could not write %s (%s)", path, err)

    def load(self, session: Any, scorer: Any, i: int) -> dict[str, torch.Tensor] | None:
        """Ingredient ``i`` of a soup session's outputs on every split of ``scorer``'s task,
        or None when not cached (the live model's dtype is the scoring dtype)."""
        if not self.enabled:
            return None
        key = self.key(scorer, session.indexes[i], _dtype(session.model))
        return self.read(key, {s: scorer.split(s).size for s in scorer.task.splits})

    def store(self, session: Any, scorer: Any, i: int, outputs: dict[str, torch.Tensor]) -> None:
        """Keep ingredient ``i``'s ``outputs`` (as :meth:`load` finds them)."""
        if self.enabled:
            self.write(self.key(scorer, session.indexes[i], _dtype(session.model)), outputs)

    def counts(self) -> dict[str, int]:
        """``{"hits": ..., "misses": ...}`` so far."""
        return {"hits": self.hits, "misses": self.misses}


def _dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def ingredient_outputs(scorer: Any) -> OutputsCache | None:
    """The outputs cache a scorer was given (:func:`attach`), if it is enabled.

    Only classification outputs (one float tensor per split, tensor batches) are kept; other
    kinds (``causal-lm``: list-valued batches) score afresh each run.
    """
    cache = getattr(scorer, "outputs_cache", None)
    if getattr(getattr(scorer, "task", None), "kind", "classification") != "classification":
        return None
    return cache if isinstance(cache, OutputsCache) and cache.enabled else None


def attach(scorer: Any, *, enabled: bool = True, root: Path | None = None) -> OutputsCache:
    """Give ``scorer`` an outputs cache (``enabled=False``: one that reads and writes nothing,
    still there to report zero hits and misses); returns it."""
    scorer.outputs_cache = OutputsCache(root, enabled=enabled)
    return scorer.outputs_cache


def record(scorer: Any, timings: dict[str, Any]) -> None:
    """Put the scorer's outputs-cache counts in a run's ``timings`` as ``cache: {hits,
    misses}`` (zeros when the cache is off)."""
    cache = getattr(scorer, "outputs_cache", None)
    if isinstance(cache, OutputsCache):
        timings["cache"] = cache.counts()
