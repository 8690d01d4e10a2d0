"""Estimates made before any weight is read: what is free on a device, a transformer's
activations, the reads a stream holds, what each learned-soup path needs, and a whole soup's
download, peak memory and time (:func:`estimate_run`, for ``hfsoup inspect``).

Plain arithmetic over config values and byte counts, kept apart from the soups that use it so
that ``hfsoup inspect`` can estimate a run without importing the evaluation stack.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from hfsoup.io.streaming import DEFAULT_CHUNK, DEFAULT_IN_FLIGHT
from hfsoup.io.tensors import FLOAT_DTYPES, IngredientIndex, output_dtype, plan_shards
from hfsoup.units import human_bytes

# Assumed when none is given: a good home or cloud link to the Hub's CDN, in bytes per second.
DEFAULT_BANDWIDTH = 50 * 10**6
DISK_BANDWIDTH = 500 * 10**6  # reading a local ingredient folder
# The task defaults a learned soup's activations are estimated with (LearnedConfig, Task).
LEARNED_BATCH, LEARNED_LENGTH = 32, 128


def path_needs(*, k: int, model_bytes: int, read_ahead: int, activations: int) -> dict[str, int]:
    """Bytes each path holds at its peak (the arguments as for :func:`hfsoup.methods.learned.plan_path`)."""
    return {
        "memory": (k + 3) * model_bytes + activations,  # k resident + live + mixture + its grad
        "stream": 2 * model_bytes + read_ahead + activations,  # live model + its gradient
    }


def available_memory(device: torch.device) -> tuple[int, str]:
    """Bytes free on ``device`` (GPU memory, or the RAM the OS can give) and where from."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"free on {device}"
    import psutil

    return psutil.virtual_memory().available, "available RAM"


def activation_bytes(config: dict[str, Any], *, batch_size: int, max_length: int) -> int:
    """Rough float32 activations of one training step of a transformer.

    Korthikanti et al. 2022 count ``s·b·h·(34 + 5·a·s/h)`` bytes per layer in 16-bit; doubled
    for float32. ``s`` is ``max_length`` tokens, or the patches of an image model.
    """
    h = config.get("hidden_size") or config.get("n_embd") or 768
    layers = config.get("num_hidden_layers") or config.get("n_layer") or 12
    heads = config.get("num_attention_heads") or config.get("n_head") or 12
    seq = max_length
    if "image_size" in config and "patch_size" in config:
        seq = (config["image_size"] // config["patch_size"]) ** 2 + 1
    return int(2 * seq * batch_size * h * (34 + 5 * heads * seq / h) * layers)


def read_ahead_bytes(ingredient_bytes: int) -> int:
    """Bytes the stream path holds while reading one ingredient: reads in flight + the current."""
    return min(DEFAULT_IN_FLIGHT + DEFAULT_CHUNK, ingredient_bytes)


class EstimateInput(NamedTuple):
    """What a method's estimate is made from (the argument of ``MergeMethod.estimate``)."""

    indexes: Sequence[IngredientIndex]
    read_bytes: int  # every ingredient's weight files, Hub and local
    max_shard_size: int
    dtype: torch.dtype | None
    device: torch.device
    # Runs with a base model θ₀ (task-vector merges, greedy ``combine``): its index; whether the
    # run is scored on a task (a task-vector merge then holds θ₀ and τ for the search); the
    # greedy soup's ``combine`` operator (None: the plain average).
    base: IngredientIndex | None = None
    scored: bool = False
    combine: str | None = None


class Peak(NamedTuple):
    """A method's estimate (what ``MergeMethod.estimate`` returns): its peak memory in bytes,
    the learned path (or None), what the estimate assumes, and whether it streams every Hub
    weight file whole (each byte hashed, cached or not) rather than downloading only what the
    HF cache lacks and reading from disk."""

    nbytes: int
    learned_path: str | None
    assumes: str
    streams_all: bool = False


def estimate_run(
    indexes: Sequence[IngredientIndex],
    details: Sequence[dict[str, Any]],
    *,
    method: str,
    estimate: Callable[[EstimateInput], Peak],
    bandwidth: float | None,
    max_shard_size: int,
    dtype: torch.dtype | None,
    device: torch.device | None,
    base: IngredientIndex | None = None,
    scored: bool = False,
    combine: str | None = None,
) -> dict[str, Any]:
    """Download size, peak memory and time of a ``method`` soup, from headers alone.

    Memory follows what each method holds (docs/design.md): a uniform soup the reads in flight
    plus one chunk (its float32 sums and output bytes; the output is written in place); a greedy
    soup the live model and one float32 running sum, plus one ingredient's reads;
    a learned soup its memory path when that fits, else its stream path (``hfsoup.methods.learned``).

    Args:
        indexes: the ingredients, indexed.
        details: per ingredient, ``weight_bytes`` (its weight files), ``cached_bytes`` (of those,
            in the HF cache) and ``local`` (a folder, not a Hub repo).
        bandwidth: bytes per second from the Hub; ``None``: :data:`DEFAULT_BANDWIDTH`.
        max_shard_size / dtype: the output options.
        device: where the soup would run; ``None``: CUDA when available, else the CPU.

        method / estimate: the method's name (reported) and its ``MergeMethod.estimate``.
        base / scored / combine: as :class:`EstimateInput` has them; ``details`` then ends
            with the base's entry, so that its bytes are downloaded and read too.
    """
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hub = [d for d in details if not d["local"]]
    weight_bytes = sum(d["weight_bytes"] for d in hub)
    local = sum(d["weight_bytes"] for d in details if d["local"])
    read = sum(d["weight_bytes"] for d in details)
    peak, path, assumed, streams_all = estimate(
        EstimateInput(indexes, read, max_shard_size, dtype, device, base, scored, combine)
    )
    download = weight_bytes - (0 if streams_all else sum(d["cached_bytes"] for d in hub))
    available, where = available_memory(device)
    rate = float(bandwidth) if bandwidth else float(DEFAULT_BANDWIDTH)
    seconds = download / rate + local / DISK_BANDWIDTH
    assumes = [
        assumed,
        f"{'the given' if bandwidth else 'an assumed'} {human_bytes(rate)}/s from the "
        f"Hub and {human_bytes(DISK_BANDWIDTH)}/s from local folders",
    ]
    return {
        "method": method,
        "device": str(device),
        "download_bytes": download,
        "hub_weight_bytes": weight_bytes,
        "local_bytes": local,
        "peak_memory_bytes": peak,
        "available_memory_bytes": available,
        "available_from": where,
        "fits": peak <= available,
        "seconds": round(seconds, 1),
        "bandwidth": rate,
        "learned_path": path,
        "assumes": assumes,
        "estimate": True,
    }


def _model_bytes(first: IngredientIndex) -> tuple[int, int]:
    """The first ingredient's float tensors in float32, and its other tensors as stored."""
    floats = [r for r in first.tensors.values() if r.dtype in FLOAT_DTYPES]
    others = sum(r.nbytes for r in first.tensors.values() if r.dtype not in FLOAT_DTYPES)
    return 4 * sum(r.numel for r in floats), others


def uniform_peak(given: EstimateInput) -> Peak:
    """The reads in flight plus one chunk's float32 sums and output bytes (written in place)."""
    indexes, read, dtype = given.indexes, given.read_bytes, given.dtype
    shards = plan_shards(indexes[0], max_shard_size=given.max_shard_size, dtype=dtype)
    acc, out = _chunk_bytes(indexes, shards, dtype)
    # In flight: the budget, the read past it and the one being added (<= a chunk each).
    peak = min(DEFAULT_IN_FLIGHT + 2 * acc, read) + acc + out
    return Peak(peak, None, (
        f"reads in flight (up to {human_bytes(DEFAULT_IN_FLIGHT + 2 * acc)}) + one chunk's "
        f"float32 sums ({human_bytes(acc)}) and its output bytes ({human_bytes(out)}), "
        "written in place (the output shard size does not count); fetching overlaps "
        "averaging"
    ), streams_all=True)  # fmt: skip


# Float32-sized buffers of one streamed piece a task-vector operator holds: θ₀, the running
# sum and τᵢ = θᵢ − θ₀; TIES also the elected signs, the agreeing count, |τᵢ| and topk's
# values and int64 indices (docs/design.md, issue 17: TIES' peak measured at ~14 × the largest
# tensor above the uniform soup's, DARE-TIES' ~10 ×); DARE its uniform draws and mask.
OPERATOR_BUFFERS = {"task_arithmetic": 4, "wise_ft": 4, "dare_linear": 8, "ties": 14,
                    "dare_ties": 10}  # fmt: skip
# The float32 bytes of one tensor group greedy ``combine`` streams the accepted set in
# (hfsoup.methods.greedy_combine.GROUP_BYTES; that module is above this one).
COMBINE_GROUP_BYTES = 64 << 20
_SCORING = ("scoring activations (the task's batch size and length) are not counted, nor is "
            "scoring time")  # fmt: skip


def greedy_peak(given: EstimateInput) -> Peak:
    """The live model and one float32 running sum, plus one ingredient's reads; with
    ``combine``, also θ₀ in float32 and the operator's buffers for one tensor group."""
    indexes = given.indexes
    model32, others = _model_bytes(indexes[0])
    largest = max(ix.nbytes for ix in indexes)
    peak = 2 * model32 + 2 * others + read_ahead_bytes(largest)
    if given.combine in (None, "average"):
        return Peak(peak, None, "the live model and one float32 running sum (float32 "
                    f"scoring), plus one ingredient's reads; {_SCORING}")  # fmt: skip
    group = min(COMBINE_GROUP_BYTES, model32)
    # One group's operator buffers, its merged result and one ingredient's copy of it.
    groups = (OPERATOR_BUFFERS[given.combine] + 2) * group
    return Peak(peak + model32 + groups, None, (
        f"the live model, one float32 running sum (the uniform baseline) and the base θ₀ in "
        f"float32 ({human_bytes(model32)}), plus one ingredient's reads and "
        f"{given.combine}'s buffers for one tensor group of at most "
        f"{human_bytes(group)} ({human_bytes(groups)}); {_SCORING}"
    ))  # fmt: skip


def task_vector_peak(given: EstimateInput, *, method: str, whole_tensors: bool) -> Peak:
    """A task-vector merge (``method``) with the base θ₀ as stream slot 0.

    Without a task: the reads in flight plus, for one chunk (a whole tensor for TIES and DARE),
    the operator's float32 buffers and the output bytes. Scored on a task: the live model and
    the uniform baseline's running sum, then for the coefficient search θ₀ and the merged
    task vector τ in float32 beside the live model (each λ is θ₀ + λ·τ set in it).
    """
    indexes, base = given.indexes, given.base
    if base is None:
        raise ValueError("a task-vector estimate needs the base model's index")
    model32, others = _model_bytes(indexes[0])
    shards = plan_shards(indexes[0], max_shard_size=given.max_shard_size, dtype=given.dtype)
    acc, out = _chunk_bytes(indexes, shards, given.dtype, whole_tensors=whole_tensors)
    buffers = OPERATOR_BUFFERS[method] * acc
    stream = min(DEFAULT_IN_FLIGHT + 2 * acc, given.read_bytes) + buffers
    piece = "whole tensor" if whole_tensors else "chunk"
    if not given.scored:
        return Peak(stream + out, None, (
            f"reads in flight (base and ingredients, up to {human_bytes(DEFAULT_IN_FLIGHT + 2 * acc)}) "
            f"+ {method}'s float32 buffers for one {piece} ({human_bytes(buffers)}: θ₀, the "
            f"sums, τᵢ) and its output bytes ({human_bytes(out)}), written in place"
        ), streams_all=True)  # fmt: skip
    live = model32 + others
    held = 2 * model32 + others  # θ₀ (integer buffers too) and τ, float32
    # Measured (a 30 MB model, BENCHMARKS.md issue 17): the stream that makes τ peaks about one
    # float32 model above θ₀, τ and its own buffers (freed pieces the allocator still holds).
    slack = model32
    return Peak(live + held + slack + stream, None, (
        f"scored on a task: the live model ({human_bytes(live)}) and, for the coefficient "
        f"search, θ₀ and the merged task vector τ in float32 ({human_bytes(held)}), plus the "
        f"stream that makes τ ({human_bytes(stream)}: reads in flight and one {piece}'s "
        f"buffers) and {human_bytes(slack)} of allocator slack measured there; {_SCORING}"
    ))  # fmt: skip


def learned_peak(given: EstimateInput) -> Peak:
    """The learned soup's memory path when it fits on the device, else its stream path."""
    indexes, device = given.indexes, given.device
    first = indexes[0]
    activations = activation_bytes(
        first.config, batch_size=LEARNED_BATCH, max_length=LEARNED_LENGTH
    )
    needs = path_needs(
        k=len(indexes),
        model_bytes=_model_bytes(first)[0],
        read_ahead=read_ahead_bytes(max(ix.nbytes for ix in indexes)),
        activations=activations,
    )
    available, _ = available_memory(device)
    path = "memory" if needs["memory"] <= available else "stream"
    return Peak(needs[path], path, (
        f"the {path} path (memory path ~{human_bytes(needs['memory'])}, stream path "
        f"~{human_bytes(needs['stream'])}), activations at batch size {LEARNED_BATCH} "
        f"and {LEARNED_LENGTH} tokens; training time is not counted"
    ))  # fmt: skip


def _chunk_bytes(
    indexes: Sequence[IngredientIndex], shards: Sequence[Sequence[str]], dtype: torch.dtype | None,
    *, whole_tensors: bool = False,
) -> tuple[int, int]:  # fmt: skip
    """The largest chunk's float32 sums and output bytes (:func:`plan_chunks`)."""
    from hfsoup.io.chunks import plan_chunks

    tensors = indexes[0].tensors
    acc = out = 0
    for chunk in plan_chunks(indexes, shards, whole_tensors=whole_tensors):
        a = o = 0
        for piece in chunk.pieces:
            ref = tensors[piece.name]
            numel = ref.numel if piece.rows is None else ref.numel // ref.shape[0] * piece.rows
            a += 4 * numel
            o += numel * output_dtype(ref, dtype).itemsize
        acc, out = max(acc, a), max(out, o)
    return acc, out


__all__ = [
    "EstimateInput",
    "Peak",
    "greedy_peak",
    "learned_peak",
    "task_vector_peak",
    "uniform_peak",
    "estimate_run",
    "activation_bytes",
    "available_memory",
    "human_bytes",
    "path_needs",
    "read_ahead_bytes",
]
