"""The one size parser and the one byte formatter.

Sizes are bytes, whatever the case of the unit: ``"5GB"``, ``"5gb"`` and ``"5Gb"`` are all
5_000_000_000 (never bits). Decimal units (kB, MB, GB, TB, PB) are powers of 1000, binary ones
(KiB, MiB, GiB, TiB, PiB) powers of 1024; a bare number or ``B`` is bytes. The same rule reads
``--max-shard-size``, ``--bandwidth``, ``--memory-budget`` and each ``--max-memory`` budget.
"""

from __future__ import annotations

# The largest size accepted (8 PiB): more is a typo, and would overflow what it is used for.
MAX_SIZE = 2**53

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "PB": 10**15,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "PIB": 2**50}  # fmt: skip


def read_size(value: str | int) -> float:
    """The number of bytes ``value`` writes, unchecked (may be zero, negative, huge or NaN).

    Raises:
        ValueError: ``value`` is not a number with an optional unit.
    """
    if isinstance(value, bool):
        raise ValueError(f"cannot read {value!r} as a size in bytes (e.g. 5GB, 500MiB)")
    if isinstance(value, int):
        return float(value)
    text = str(value).strip().upper().replace(" ", "")
    number = text.rstrip("KMGTPIB")
    try:
        return float(number) * _UNITS[text[len(number) :]]
    except (KeyError, ValueError) as exc:
        raise ValueError(f"cannot read {value!r} as a size in bytes (e.g. 5GB, 500MiB)") from exc


def parse_size(value: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000; ``"500MiB"`` -> 524_288_000; ints pass through (bytes).

    Raises:
        ValueError: unreadable, not positive, or larger than :data:`MAX_SIZE`.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        amount = read_size(value)
        if not amount > 0:  # negative, zero or NaN
            raise ValueError(f"size must be positive, got {value!r}")
        # Compared as a float: int() of an overflowing value (1e400GB is inf) would raise.
        size = int(amount) if amount <= MAX_SIZE else MAX_SIZE + 1
    if size <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    if size > MAX_SIZE:
        raise ValueError(f"size {value!r} is too large (at most 8PiB)")
    return size


def human_bytes(n: float, *, binary: bool = False) -> str:
    """``1234567`` -> ``"1.2 MB"`` (decimal units, as sizes are read); with ``binary``,
    ``17600000`` -> ``"16.8 MiB"`` (for memory, which devices count in powers of 1024)."""
    step, units = (1024, ("B", "KiB", "MiB", "GiB", "TiB")) if binary else (
        1000, ("B", "KB", "MB", "GB", "TB"))  # fmt: skip
    for unit in units[:-1]:
        if abs(n) < step:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= step
    return f"{n:.1f} {units[-1]}"
