"""docs/reliability.md is generated from the reliability-marked tests and must be up to date."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location(
        "reliability_table", ROOT / "scripts" / "reliability_table.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_reliability_table_is_up_to_date():
    script = _script()
    expected = script.render(script.collect())
    current = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    assert current == expected, (
        "docs/reliability.md is stale: run python scripts/reliability_table.py"
    )


def test_every_listed_test_exists_once():
    rows = _script().collect()
    assert len({(r.file, r.test) for r in rows}) == len(rows)
    assert all(r.case and r.sees for r in rows)
