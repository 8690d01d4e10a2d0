"""The outputs cache across runs (hfsoup.tasks.output_cache): a second run scores no ingredient
again, gives the same numbers as a run without it, ignores and rewrites a damaged entry,
writes and reads nothing with --no-cache, works offline, and keys on what changes outputs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import hfsoup
from hfsoup.methods.greedy import SoupSession
from hfsoup.tasks import output_cache
from hfsoup.tasks.classification import Scorer


@pytest.fixture
def counted(monkeypatch):
    """Counts forward passes (batches) of every scorer, and the splits of ingredients scored
    (``shown``: the scorer's outputs asked for under an ingredient's key)."""
    counts = {"forward": 0, "shown": 0}
    forward, outputs = Scorer._forward, Scorer.outputs

    def counting_forward(model, batch):
        counts["forward"] += 1
        return forward(model, batch)

    def counting_outputs(self, model, split, *, key=None):
        counts["shown"] += key is not None
        return outputs(self, model, split, key=key)

    monkeypatch.setattr(Scorer, "_forward", staticmethod(counting_forward))
    monkeypatch.setattr(Scorer, "outputs", counting_outputs)
    return counts


def _batches(s) -> int:
    """Forward passes to score one model on every split of the task."""
    size = s["task"]["batch_size"]
    return sum(-(-len(s["splits"][name]) // size) for name in ("validation", "test"))


def _root() -> Path:
    return Path(os.environ[output_cache.ENV_ROOT])


def _greedy(s, out, **kw):
    return hfsoup.soup(s["repos"], output=out, method="greedy", task=s["task"], progress=False,
                       **kw)  # fmt: skip


def test_runs_after_an_evaluate_score_no_ingredient_again(hub, sentiment, tmp_path, counted):
    s, k = sentiment, len(sentiment["repos"])
    report = hfsoup.evaluate(s["repos"], task=s["task"], progress=False)
    assert counted["forward"] == k * _batches(s) and counted["shown"] == 2 * k
    assert report["timings"]["cache"] == {"hits": 0, "misses": k}
    assert len(list(_root().glob("*.safetensors"))) == k

    runs = [("greedy", {}), ("greedy", {"accept": ">"}), ("learned", {"learned": {"epochs": 1}})]
    for n, (method, kw) in enumerate(runs):
        counted["forward"] = counted["shown"] = 0
        result = hfsoup.soup(s["repos"], output=tmp_path / f"soup{n}", method=method,
                             task=s["task"], progress=False, **kw)  # fmt: skip
        assert counted["shown"] == 0, method  # no ingredient shown to the model for scoring
        assert result.results["timings"]["cache"] == {"hits": k, "misses": 0}
        # Without the cache the same run makes exactly k scoring passes more.
        cached = counted["forward"]
        counted["forward"] = 0
        plain = hfsoup.soup(s["repos"], output=tmp_path / f"plain{n}", method=method,
                            task=s["task"], progress=False, cache=False, **kw)  # fmt: skip
        assert counted["forward"] - cached == k * _batches(s), method
        assert plain.results["timings"]["cache"] == {"hits": 0, "misses": 0}
        for key in ("ingredients", "table", method):
            ours, theirs = result.results[key], plain.results[key]
            if method == "learned" and key == method:  # the time estimate is a measurement
                ours, theirs = (_without(r, "estimate") for r in (ours, theirs))
            assert ours == theirs, (method, key)
        soup = (tmp_path / f"soup{n}" / "model.safetensors").read_bytes()
        assert soup == (tmp_path / f"plain{n}" / "model.safetensors").read_bytes()


def _without(record: dict, name: str) -> dict:
    return {k: v for k, v in record.items() if k != name}


def test_cached_outputs_equal_the_scored_ones(hub, sentiment):
    s = sentiment
    hfsoup.evaluate(s["repos"][:2], task=s["task"], progress=False)
    again = _scorer_outputs(s, cache=True)
    fresh = _scorer_outputs(s, cache=False)
    assert again.keys() == fresh.keys()
    for key in fresh:
        assert torch.equal(again[key], fresh[key]), key


def _scorer_outputs(s, *, cache: bool) -> dict:
    from hfsoup.api import load_ingredients
    from hfsoup.methods.greedy import score_ingredients
    from hfsoup.methods.shared import make_scorer
    from hfsoup.tasks.task import resolve_task

    indexes = load_ingredients(s["repos"][:2])
    scorer = make_scorer(resolve_task(s["task"]), indexes[0], progress=False, cache=cache)
    score_ingredients(SoupSession(indexes), scorer, labels=["a", "b"])
    assert scorer.outputs_cache.counts()["hits"] == (2 if cache else 0)
    return dict(scorer.cache)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_rows", "wrong_dtype"])
def test_a_damaged_entry_is_ignored_and_rewritten(hub, sentiment, tmp_path, counted, damage):
    from safetensors import safe_open
    from safetensors.torch import save_file

    s, repos = sentiment, sentiment["repos"][:2]
    first = hfsoup.evaluate(repos, task=s["task"], progress=False)
    entries = sorted(_root().glob("*.safetensors"))
    assert len(entries) == 2
    victim = entries[0]
    with safe_open(str(victim), framework="pt") as f:
        key, tensors = f.metadata()["key"], {n: f.get_tensor(n).clone() for n in f.keys()}  # noqa: SIM118
    if damage == "garbage":
        victim.write_bytes(b"not a safetensors file")
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:-40])
    elif damage == "wrong_rows":
        save_file({n: t[:-1].contiguous() for n, t in tensors.items()}, victim, {"key": key})
    else:
        save_file({n: t.double() for n, t in tensors.items()}, victim, {"key": key})
    counted["forward"] = 0
    second = hfsoup.evaluate(repos, task=s["task"], progress=False)
    assert second["timings"]["cache"] == {"hits": 1, "misses": 1}
    assert counted["forward"] == _batches(s)  # only the damaged ingredient scored again
    assert second["ingredients"] == first["ingredients"]
    assert second["table"] == first["table"]
    with safe_open(str(victim), framework="pt") as f:  # rewritten whole
        assert f.metadata()["key"] == key
        for n, t in tensors.items():
            assert torch.equal(f.get_tensor(n), t)
    assert not list(_root().glob(".tmp-*"))


def test_no_cache_neither_reads_nor_writes(hub, sentiment, tmp_path, counted):
    s, repos = sentiment, sentiment["repos"][:2]
    hfsoup.evaluate(repos, task=s["task"], progress=False, cache=False)
    assert not _root().exists() or not any(_root().iterdir())
    hfsoup.evaluate(repos, task=s["task"], progress=False)  # fills it
    before = {p: p.stat().st_mtime_ns for p in _root().iterdir()}
    counted["forward"] = 0
    result = _greedy(s | {"repos": repos}, tmp_path / "soup", cache=False)
    assert result.results["timings"]["cache"] == {"hits": 0, "misses": 0}
    assert counted["shown"] >= 4  # both ingredients scored on both splits
    assert {p: p.stat().st_mtime_ns for p in _root().iterdir()} == before


def test_no_cache_on_the_command_line(hub, sentiment):
    from conftest import run_cli

    s, repos = sentiment, sentiment["repos"][:2]
    args = ["evaluate", *repos, "--dataset", s["task"]["dataset"], "--selection-split",
            "validation", "--report-split", "test", "--input-column", "text",
            "--label-column", "label", "--metric", "accuracy", "--batch-size", "32", "--json"]  # fmt: skip
    done = run_cli(*args, "--no-cache")
    assert done.returncode == 0, done.stderr
    assert not _root().exists() or not any(_root().iterdir())
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    assert len(list(_root().glob("*.safetensors"))) == 2
    assert json.loads(done.stdout)["timings"]["cache"] == {"hits": 0, "misses": 2}


def test_offline_runs_read_the_cache(hub, sentiment, tmp_path, counted, monkeypatch):
    s = sentiment
    hfsoup.evaluate(s["repos"], task=s["task"], progress=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    counted["shown"] = 0
    result = _greedy(s, tmp_path / "soup")
    assert counted["shown"] == 0
    assert result.results["timings"]["cache"]["hits"] == len(s["repos"])


def test_the_key_follows_what_changes_outputs(hub, sentiment, tmp_path):
    """Another max length, another score dtype, another ingredient: another entry; a local
    copy of a repo is keyed by its files' bytes, and editing a weight file changes its key."""
    from hfsoup.api import load_ingredients
    from hfsoup.methods.shared import make_scorer
    from hfsoup.tasks.task import resolve_task

    s = sentiment
    (a, b) = load_ingredients(s["repos"][:2])
    cache = output_cache.OutputsCache(tmp_path / "c")
    scorer = make_scorer(resolve_task(s["task"]), a, progress=False)
    short = make_scorer(resolve_task(s["task"] | {"max_length": 8}), a, progress=False)
    keys = {
        cache.key(scorer, a, torch.float32),
        cache.key(scorer, b, torch.float32),
        cache.key(short, a, torch.float32),
        cache.key(scorer, a, torch.bfloat16),
    }
    assert len(keys) == 4
    # The same task prepared again gives the same fingerprint.
    again = make_scorer(resolve_task(s["task"]), a, progress=False)
    assert output_cache.task_fingerprint(again) == output_cache.task_fingerprint(scorer)

    local = tmp_path / "local"
    shutil.copytree(s["dirs"][0], local)
    (ix,) = load_ingredients([str(local)])
    first = output_cache.ingredient_key(ix)
    assert first.startswith("files:") and first == output_cache.ingredient_key(ix)
    weights = local / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    (ix,) = load_ingredients([str(local)])
    assert output_cache.ingredient_key(ix) != first


def test_a_learned_soup_resumes_after_an_interrupt(hub, sentiment, tmp_path, monkeypatch):
    from hfsoup.errors import NothingToResumeError
    from hfsoup.io.writer import partial_dir
    from hfsoup.methods import learned_state

    s = sentiment
    options = {"method": "learned", "task": s["task"], "progress": False,
               "learned": {"epochs": 3, "lr": 0.1}}  # fmt: skip
    whole = hfsoup.soup(s["repos"], output=tmp_path / "whole", **options)
    with pytest.raises(NothingToResumeError):
        hfsoup.soup(s["repos"], output=tmp_path / "cut", resume=True, **options)

    save, epochs = learned_state.LearnedState.save, []

    def interrupting_save(self, checkpoint):
        save(self, checkpoint)
        epochs.append(checkpoint["epoch"])
        if checkpoint["epoch"] == 1:
            raise RuntimeError("injected interrupt after epoch 1")

    monkeypatch.setattr(learned_state.LearnedState, "save", interrupting_save)
    with pytest.raises(RuntimeError, match="injected"):
        hfsoup.soup(s["repos"], output=tmp_path / "cut", **options)
    assert (partial_dir((tmp_path / "cut").resolve()) / learned_state.LEARNED_STATE).is_file()
    epochs.clear()
    resumed = hfsoup.soup(s["repos"], output=tmp_path / "cut", resume=True, **options)
    assert epochs == [2, 3]  # epoch 1 was not trained again
    ours, theirs = resumed.results["learned"], whole.results["learned"]
    assert ours["alpha"] == theirs["alpha"] and ours["beta"] == theirs["beta"]
    assert ours["loss"] == theirs["loss"]
    weights = (tmp_path / "cut" / "model.safetensors").read_bytes()
    assert weights == (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert not (tmp_path / "cut" / learned_state.LEARNED_STATE).exists()


def test_a_learned_checkpoint_of_another_run_is_not_resumed(hub, sentiment, tmp_path, monkeypatch):
    from hfsoup.errors import NothingToResumeError
    from hfsoup.methods import learned_state

    s = sentiment
    options = {"method": "learned", "task": s["task"], "progress": False}
    save = learned_state.LearnedState.save

    def interrupting_save(self, checkpoint):
        save(self, checkpoint)
        raise RuntimeError("injected interrupt")

    monkeypatch.setattr(learned_state.LearnedState, "save", interrupting_save)
    with pytest.raises(RuntimeError):
        hfsoup.soup(s["repos"], output=tmp_path / "cut", learned={"epochs": 2}, **options)
    monkeypatch.undo()
    with pytest.raises(NothingToResumeError, match="cannot resume"):
        hfsoup.soup(s["repos"], output=tmp_path / "cut", learned={"epochs": 3}, resume=True,
                    **options)  # fmt: skip
