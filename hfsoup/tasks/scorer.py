"""The classification scorer under its former module name (it lives in
:mod:`hfsoup.tasks.classification`; the task-kind protocol in :mod:`hfsoup.tasks.kinds`)."""

from __future__ import annotations

from hfsoup.tasks.classification import Scorer, required_count
from hfsoup.tasks.kinds import EarlyStop

__all__ = ["EarlyStop", "Scorer", "required_count"]
