"""A soup of LoRA adapters written back as one adapter: rank-R SVD of the averaged ΔW.

The soup θ is first written as a full model (every method does that); then, one target module
at a time, ΔW = θ − θ₀ is read back from the soup and the base, factorised by a truncated SVD
(ΔW ≈ B·A with B = U_R·S_R, A = V_Rᵀ, lora_alpha = R so the scaling is 1), and its relative
Frobenius error ‖ΔW − B·A‖_F / ‖ΔW‖_F recorded. Tensors the adapters saved whole (a
classifier head) are written whole (``modules_to_save``). The full weights are then removed:
what is left loads with ``PeftModel.from_pretrained(base, folder)``.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from hfsoup.compute.combine import one_cpu_thread
from hfsoup.io.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, BoundAdapter, LoraModule
from hfsoup.io.refs import IngredientIndex, TensorRef
from hfsoup.io.streaming import iter_tensors
from hfsoup.io.tensors import DTYPES, parse_header

log = logging.getLogger("hfsoup")

_PREFIX = "base_model.model."
_INDEX = "model.safetensors.index.json"


@dataclass
class AdapterWritten:
    """What :func:`write_adapter` wrote: the rank and each module's relative error."""

    rank: int
    errors: dict[str, float]

    def record(self) -> dict:
        """results.json's ``lora.output_adapter`` block."""
        values = list(self.errors.values())
        return {
            "rank": self.rank,
            "modules": len(values),
            "relative_frobenius_error": {
                "max": max(values, default=0.0),
                "mean": sum(values) / len(values) if values else 0.0,
                "per_module": self.errors,
            },
        }


def truncated(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(B, A, error)``: the best rank-``rank`` factorisation B·A of ``delta`` (out × in) and
    its relative Frobenius error (0 for a zero ``delta``)."""
    delta = delta.float()
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = min(rank, s.numel())
    b, a = u[:, :r] * s[:r], vh[:r]
    norm = torch.linalg.matrix_norm(delta).item()
    err = torch.linalg.matrix_norm(delta - b @ a).item() / norm if norm > 0 else 0.0
    if r < rank:  # a module smaller than the rank: pad with zeros so every module has rank R
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], 1)
        a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])], 0)
    return b.float().contiguous(), a.float().contiguous(), err


def soup_modules(
    indexes: Sequence[IngredientIndex],
) -> tuple[dict[str, LoraModule], dict[str, str]]:
    """The target modules (by base tensor) and whole-saved tensors of all the adapters."""
    modules: dict[str, LoraModule] = {}
    replaced: dict[str, str] = {}
    for ix in indexes:
        adapter: BoundAdapter = ix.adapter
        for name, m in adapter.modules.items():
            modules.setdefault(name, m)
        for name, key in adapter.replaced.items():
            replaced.setdefault(name, key)
    return modules, replaced


def write_adapter(folder: Path, indexes: Sequence[IngredientIndex], *, rank: int) -> AdapterWritten:
    """Replace the full soup in ``folder`` by one LoRA adapter of rank ``rank`` on the base.

    Memory: one module's soup tensor, base tensor and ΔW at a time.
    """
    base = indexes[0].adapter.base
    modules, replaced = soup_modules(indexes)
    weights: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    # One torch thread: LAPACK's OpenMP threads spin-wait beside busy processes (a 3072 x 768
    # SVD took 8 s on two shared cores, 0.6 s on one thread; BENCHMARKS.md).
    with _Soup(folder) as soup, one_cpu_thread("cpu"):
        for name, theta0 in iter_tensors(base, sorted(modules)):
            m = modules[name]
            delta = soup.get_tensor(name).float() - theta0.float()
            b, a, errors[m.module] = truncated(delta.T if m.transpose else delta, rank)
            kind = ("lora_embedding_A", "lora_embedding_B") if m.embedding else (
                "lora_A.weight", "lora_B.weight")  # fmt: skip
            weights[f"{_PREFIX}{m.module}.{kind[0]}"] = a
            weights[f"{_PREFIX}{m.module}.{kind[1]}"] = b
        for name, key in replaced.items():
            weights[key] = soup.get_tensor(name).contiguous()
    save_file(weights, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = _config(indexes, modules, replaced, rank)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for f in soup.files:
        (folder / f).unlink(missing_ok=True)
    done = AdapterWritten(rank=rank, errors=errors)
    worst = done.record()["relative_frobenius_error"]
    log.info("adapter of rank %d: relative error max %.3g, mean %.3g", rank, worst["max"],
             worst["mean"])  # fmt: skip
    return done


class _Soup:
    """The soup's tensors by name, from ``model.safetensors`` or the shards its index names.

    Read with plain file reads, one tensor at a time: a memory map would keep every page it
    touched resident (and counted) until the end.
    """

    def __init__(self, folder: Path) -> None:
        index = folder / _INDEX
        if index.is_file():
            where = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(where.values()))
            self.files = [*shards, _INDEX]
        else:
            shards, where = ["model.safetensors"], None
            self.files = shards
        self.refs: dict[str, tuple[Path, TensorRef]] = {}
        for shard in shards:
            path = folder / shard
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                raw = struct.pack("<Q", n) + f.read(n)
            for name, ref in parse_header(raw, file=shard, file_size=path.stat().st_size).items():
                if where is None or where.get(name) == shard:
                    self.refs[name] = (path, ref)

    def __enter__(self) -> _Soup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.refs.clear()

    def get_tensor(self, name: str) -> torch.Tensor:
        path, ref = self.refs[name]
        buf = bytearray(ref.nbytes)
        with open(path, "rb") as f:
            f.seek(ref.start)
            f.readinto(buf)
        return torch.frombuffer(buf, dtype=DTYPES[ref.dtype]).view(ref.shape)


def _config(
    indexes: Sequence[IngredientIndex], modules: dict[str, LoraModule], replaced: dict[str, str],
    rank: int,
) -> dict:  # fmt: skip
    """The first adapter's config, with this adapter's rank, modules and base."""
    first: BoundAdapter = indexes[0].adapter
    config = dict(first.file.config)
    for key in ("rank_pattern", "alpha_pattern"):
        config.pop(key, None)
    base = first.base.ingredient
    saved = sorted({key[len(_PREFIX):].rsplit(".", 1)[0].replace(".modules_to_save.default", "")
                    for key in replaced.values()})  # fmt: skip
    config.update(
        r=rank, lora_alpha=rank, use_rslora=False, use_dora=False,
        target_modules=sorted({m.module for m in modules.values()}),
        modules_to_save=saved or None,
        fan_in_fan_out=any(m.transpose and not m.embedding for m in modules.values()),
        base_model_name_or_path=base.spec.repo or str(base.spec.path), revision=base.sha,
    )  # fmt: skip
    return config
