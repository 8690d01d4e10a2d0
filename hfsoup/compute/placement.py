"""Where the model being scored and its running sum live: one device, or an accelerate device map.

``--device`` picks the device (``auto`` = this process's GPU when there is one, else the CPU).
``--device-map auto|balanced|sequential`` spreads the model over every visible GPU instead (or
over this process's GPU under ``accelerate launch``), spilling to the CPU when they are full:
the model is built on the ``meta`` device (``init_empty_weights``), accelerate's
``infer_auto_device_map`` assigns each block a device within ``--max-memory`` (accelerate's
syntax: ``0=20GiB cpu=64GiB``; sizes as :mod:`hfsoup.units` reads them), and
``attach_align_device_hook_on_blocks`` places the blocks and moves activations between them.
Unlike ``dispatch_model``, blocks that spill to the CPU *run* there rather than being copied to
the GPU at every forward pass: a soup rewrites the weights in place between forward passes, so
they must stay real tensors.

The memory planned for each parameter is its scoring copy (``--score-dtype``) plus the float32
running sum kept beside it; the budgets given to accelerate are scaled down accordingly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from hfsoup.errors import IncompatibleIngredientsError, InsufficientMemoryError, RecipeError
from hfsoup.units import human_bytes, read_size

DEVICE_MAPS = ("auto", "balanced", "sequential")


@dataclass(frozen=True)
class Placement:
    """Module name -> device for the live model (``{"": "cpu"}`` when it is on one device).

    Attributes:
        devices: accelerate's device map with devices as strings (``"cuda:0"``, ``"cpu"``), in
            the model's module order (the first entry holds the embeddings).
        score_dtype: dtype of the model that is scored; running sums stay float32.
        strategy: the ``--device-map`` asked for, or None for one device.
        budgets: the memory per device the map was planned within (bytes, before the running
            sum's share), when a map was planned.
    """

    devices: dict[str, str]
    score_dtype: torch.dtype = torch.float32
    strategy: str | None = None
    budgets: dict[str, int] = field(default_factory=dict)

    @classmethod
    def single(
        cls, device: torch.device | str, score_dtype: torch.dtype = torch.float32
    ) -> Placement:
        return cls({"": str(torch.device(device))}, score_dtype)

    @property
    def main_device(self) -> torch.device:
        """Where batches go: the device of the first block (the embeddings)."""
        return torch.device(next(iter(self.devices.values())))

    @property
    def is_single(self) -> bool:
        """One entry: the model is moved whole, with no hooks."""
        return len(self.devices) == 1

    def device_for(self, name: str) -> torch.device:
        """The device of the block holding tensor ``name`` (longest module-name prefix)."""
        best, found = -1, self.main_device
        for module, device in self.devices.items():
            if (module == "" or name == module or name.startswith(module + ".")) and len(
                module
            ) > best:
                best, found = len(module), torch.device(device)
        return found

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move ``model`` to its device(s); with several, hooks move activations between them."""
        if self.is_single:
            return model.to(self.main_device)
        from accelerate.hooks import attach_align_device_hook_on_blocks

        attach_align_device_hook_on_blocks(
            model,
            execution_device={name: torch.device(d) for name, d in self.devices.items()},
            offload=False,
            skip_keys=getattr(model, "_skip_keys_device_placement", None),
        )
        return model

    def describe(self) -> dict[str, Any]:
        """For results.json and the card: the strategy and how many blocks each device holds."""
        counts: dict[str, int] = {}
        for device in self.devices.values():
            counts[device] = counts.get(device, 0) + 1
        return {
            "device_map": self.strategy,
            "blocks_per_device": counts,
            "score_dtype": str(self.score_dtype).removeprefix("torch."),
        }


def parse_max_memory(items: str | Mapping | list[str] | None) -> dict[int | str, int]:
    """accelerate's ``max_memory``: ``{0: bytes, 1: bytes, "cpu": bytes}`` from flags or a mapping.

    Accepts ``["0=20GiB", "cpu=64GiB"]``, ``"0=20GiB,cpu=64GiB"``, or a mapping; devices may be
    written ``0``, ``cuda:0`` or ``cpu``. Sizes are read as :func:`hfsoup.units.parse_size` reads
    every size (``5Gb`` is 5 GB, where accelerate's own parser would read 5 gigabits).

    Raises:
        RecipeError: an item is not ``DEVICE=SIZE`` or names an unknown device or size.
    """
    if items is None:
        return {}

    if isinstance(items, Mapping):
        pairs = [(str(k), v) for k, v in items.items()]
    else:
        text = [items] if isinstance(items, str) else list(items)
        pairs = []
        for item in (p for t in text for p in t.split(",") if p.strip()):
            key, sep, value = item.strip().partition("=")
            if not sep or not value:
                raise RecipeError(
                    f"max_memory: {item!r} is not DEVICE=SIZE (e.g. 0=20GiB cpu=64GiB)",
                    options=["max_memory"],
                )
            pairs.append((key.strip(), value.strip()))
    out: dict[int | str, int] = {}
    for key, value in pairs:
        device: int | str
        if key.isdigit():
            device = int(key)
        elif key.startswith("cuda:") and key[5:].isdigit():
            device = int(key[5:])
        elif key == "cpu":
            device = "cpu"
        else:
            raise RecipeError(
                f"max_memory: unknown device {key!r} (use 0, cuda:0, ... or cpu)",
                options=["max_memory"],
            )
        try:
            out[device] = int(read_size(value))  # "5Gb" is 5 GB (hfsoup.units), never bits
        except ValueError:
            raise RecipeError(
                f"max_memory: {value!r} is not a size (e.g. 20GiB)", options=["max_memory"]
            ) from None
        if out[device] <= 0:
            raise RecipeError(f"max_memory: {key}={value} must be positive", options=["max_memory"])
    return out


def model_class(config: Mapping) -> tuple[type, Any]:
    """The ``transformers`` class of the config's architecture and its config object.

    Raises:
        IncompatibleIngredientsError: the architecture is not one ``transformers`` knows.
    """
    import transformers
    from transformers import AutoConfig

    config = dict(config)
    arch = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise IncompatibleIngredientsError(
            f"architecture {arch!r} is not in transformers; scoring needs a known architecture"
        )
    return cls, AutoConfig.for_model(**config)


def meta_model(config: Mapping, score_dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The config's model on the ``meta`` device: shapes without memory, for planning."""
    from accelerate import init_empty_weights

    cls, cfg = model_class(config)
    with init_empty_weights():
        return cls._from_config(cfg, dtype=score_dtype)


def infer_device_map(
    model: torch.nn.Module,
    budgets: Mapping[int | str, int],
    *,
    strategy: str = "auto",
    score_dtype: torch.dtype = torch.float32,
    accumulate: torch.dtype = torch.float32,
) -> dict[str, str]:
    """Assign each block of ``model`` (usually on ``meta``) a device within ``budgets``.

    Each parameter needs its scoring copy plus a running sum in ``accumulate`` beside it, so
    accelerate plans with every budget scaled by ``score bytes / (score + sum bytes)``.
    ``auto`` and ``balanced`` even the load over the GPUs; ``sequential`` fills GPU 0 first.

    Raises:
        InsufficientMemoryError: the model and its running sum do not fit in the budgets.
    """
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    if strategy not in DEVICE_MAPS:
        raise RecipeError(f"unknown device map {strategy!r} (use {', '.join(DEVICE_MAPS)})")
    score_bytes = torch.tensor([], dtype=score_dtype).element_size()
    share = score_bytes / (score_bytes + torch.tensor([], dtype=accumulate).element_size())
    scaled = {k: int(v * share) for k, v in budgets.items()}
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    gpus = [k for k in scaled if isinstance(k, int)]
    if strategy in ("auto", "balanced") and len(gpus) > 1:
        scaled = get_balanced_memory(
            model, scaled, no_split_module_classes=no_split, dtype=score_dtype
        )
    device_map = infer_auto_device_map(
        model, max_memory=scaled, no_split_module_classes=no_split, dtype=score_dtype
    )
    if any(d == "disk" for d in device_map.values()) or not device_map:
        need = model_bytes(model, accumulate)
        given = ", ".join(f"{k}={_size(v)}" for k, v in budgets.items())
        raise InsufficientMemoryError(
            f"the model ({_size(need)} with its running sum) does not fit in the memory given "
            f"({given}); raise max_memory or use more devices",
            options=["max_memory"],
        )
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    ordered = sorted(device_map.items(), key=lambda item: order.get(item[0], len(order)))
    return {name: _device_name(d) for name, d in ordered}


def model_bytes(model: torch.nn.Module, accumulate: torch.dtype = torch.float32) -> int:
    """Bytes of ``model``'s parameters plus a running sum in ``accumulate`` beside each."""
    extra = torch.tensor([], dtype=accumulate).element_size()
    return sum(p.numel() * (p.element_size() + extra) for p in model.parameters())


def _size(n: float) -> str:
    """A memory size in a message, in binary units (:func:`hfsoup.units.human_bytes`)."""
    return human_bytes(n, binary=True)


def _device_name(device: int | str | torch.device) -> str:
    return f"cuda:{device}" if isinstance(device, int) else str(device)


def visible_budgets(gpus: list[int]) -> dict[int | str, int]:
    """Free memory on ``gpus`` (90%, leaving room for activations) and available RAM."""
    import psutil

    budgets: dict[int | str, int] = {i: int(torch.cuda.mem_get_info(i)[0] * 0.9) for i in gpus}
    budgets["cpu"] = int(psutil.virtual_memory().available * 0.9)
    return budgets


def plan_placement(
    config: Mapping,
    *,
    device: torch.device,
    device_map: str | None = None,
    max_memory: Mapping[int | str, int] | None = None,
    score_dtype: torch.dtype = torch.float32,
    accumulate: torch.dtype = torch.float32,
    all_gpus: bool = True,
) -> Placement:
    """The placement the options ask for.

    Args:
        config: the ingredients' config (the architecture to plan for).
        device: the resolved ``--device`` (this process's device under ``accelerate launch``).
        device_map: ``None`` (everything on ``device``) or a strategy from :data:`DEVICE_MAPS`.
        max_memory: parsed ``--max-memory``; default: free GPU memory and available RAM.
        all_gpus: plan over every visible GPU (``--device auto`` in one process); otherwise
            over ``device`` (and the CPU) only. With several GPUs and no ``device_map``, a model
            (with its running sum) too big for the first GPU is spread as by ``auto``.

    Raises:
        RecipeError: ``max_memory`` without a device map, or naming a GPU that is not visible.
        InsufficientMemoryError: the model does not fit in the memory given.
    """
    if device_map is None and max_memory:
        raise RecipeError(
            "max_memory applies only with a device_map; set device_map to auto",
            options=["max_memory", "device_map"],
        )
    model = None  # the meta model, built at most once
    if device_map is None and all_gpus and device.type == "cuda" and torch.cuda.device_count() > 1:
        # --device auto with several GPUs: one GPU if the model and its sum fit there, else all.
        model = meta_model(config, score_dtype)
        need = model_bytes(model, accumulate)
        if need > visible_budgets([device.index or 0])[device.index or 0]:
            device_map = "auto"
    if device_map is None:
        return Placement.single(device, score_dtype)
    if device_map not in DEVICE_MAPS:
        raise RecipeError(f"unknown device map {device_map!r} (use {', '.join(DEVICE_MAPS)})")
    if device.type == "cuda":
        gpus = list(range(torch.cuda.device_count())) if all_gpus else [device.index or 0]
    else:
        gpus = []
    budgets = dict(max_memory) if max_memory else visible_budgets(gpus)
    for key in budgets:
        if isinstance(key, int) and key not in gpus:
            seen = ", ".join(map(str, gpus)) or "none"
            raise RecipeError(
                f"max_memory names GPU {key}, but the GPUs in use are: {seen}",
                options=["max_memory"],
            )
    budgets.setdefault("cpu", visible_budgets([])["cpu"])
    model = model if model is not None else meta_model(config, score_dtype)
    devices = infer_device_map(
        model, budgets, strategy=device_map, score_dtype=score_dtype, accumulate=accumulate
    )
    return Placement(
        devices, score_dtype, strategy=device_map,
        budgets={_device_name(k): v for k, v in budgets.items()},
    )  # fmt: skip
