"""Memory estimates made before any weight is read: what is free on a device, a transformer's
activations, the reads a stream holds, what each learned-soup path needs.

Plain arithmetic over config values and byte counts, kept apart from the soups that use it so
that ``hfsoup inspect`` can estimate a run without importing the evaluation stack.
"""

from __future__ import annotations

from typing import Any

import torch

from hfsoup.streaming import DEFAULT_CHUNK, DEFAULT_IN_FLIGHT


def path_needs(*, k: int, model_bytes: int, read_ahead: int, activations: int) -> dict[str, int]:
    """Bytes each path holds at its peak (the arguments as for :func:`hfsoup.learned.plan_path`)."""
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


def human_bytes(n: float) -> str:
    """``1234567`` -> ``"1.2 MB"`` (decimal units, as ``--max-shard-size`` reads them)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


__all__ = [
    "activation_bytes",
    "available_memory",
    "human_bytes",
    "path_needs",
    "read_ahead_bytes",
]
