"""The one dtype table: safetensors codes, torch dtypes, the names options take, item sizes.

Every dtype hfsoup reads or writes is named here once: the codes of a safetensors header
(``"BF16"``), the torch dtype each stands for, which of them are averaged (the floating ones;
every other dtype is an integer buffer taken from the first ingredient), and the names the
``--dtype``, ``--score-dtype`` and ``--accumulate`` options accept (``"bfloat16"``).
"""

from __future__ import annotations

import torch

# safetensors header code -> torch dtype (every code the safetensors format defines that torch has).
SAFETENSORS: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# The codes that are averaged (in float32 or --accumulate).
FLOAT_CODES = frozenset(code for code, dtype in SAFETENSORS.items() if dtype.is_floating_point)
# torch dtype -> safetensors code (for tensors read from a pickle).
CODE_OF: dict[torch.dtype, str] = {dtype: code for code, dtype in SAFETENSORS.items()}

# The names --dtype accepts (the output dtype), in the order messages list them.
OUTPUT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# The names --score-dtype accepts (the same dtypes), in the order messages list them.
SCORE_DTYPES: dict[str, torch.dtype] = {
    name: OUTPUT_DTYPES[name] for name in ("float32", "bfloat16", "float16")
}
# The names --accumulate accepts: the dtype of the running sums.
ACCUMULATE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}


def itemsize(code: str) -> int:
    """Bytes per element of a safetensors dtype code (``"BF16"`` -> 2).

    Raises:
        KeyError: ``code`` is not in :data:`SAFETENSORS`.
    """
    return SAFETENSORS[code].itemsize


def name_of(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``, the name the options and results.json use."""
    return str(dtype).removeprefix("torch.")
