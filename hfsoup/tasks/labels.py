"""Label alignment, read by the indexing checks: it lives in :mod:`hfsoup.check.labels`."""

from __future__ import annotations

from hfsoup.check.labels import label_permutation

__all__ = ["label_permutation"]
