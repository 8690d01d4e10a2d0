"""``hfsoup inspect`` for runs with a base model θ₀ (issue 17): the base's bytes are read and
downloaded too, its float32 copy is counted for greedy ``combine``, a task-vector merge scored
on a task counts θ₀ and the merged task vector τ beside the live model, and a base missing or
not taken is one line, exit 2. (The estimate beside the measured peak: benchmarks/
bench_task_vectors.py.)"""

from __future__ import annotations

import pytest
from factories import make_model, save_ingredient, tiny_bert_config
from greedy_fixtures import tokenizer
from safetensors.torch import load_file

import hfsoup


def _folder(path, config, seed, tok):
    folder = save_ingredient(path, config, seed=seed) if seed else path
    if not seed:
        make_model(config, 0).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def models(tmp_path):
    tok = tokenizer(tmp_path)
    base = _folder(tmp_path / "base", tiny_bert_config(), 0, tok)
    return base, [_folder(tmp_path / f"ft{i}", tiny_bert_config(), i, tok) for i in (1, 2, 3)]


def _float32_bytes(folder) -> int:
    tensors = load_file(folder / "model.safetensors")
    return 4 * sum(t.numel() for t in tensors.values() if t.is_floating_point())


def _weight_bytes(folder) -> int:
    return (folder / "model.safetensors").stat().st_size


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear", "dare_ties",
                                    "wise_ft"])  # fmt: skip
def test_a_task_vector_estimate_reads_the_base_too(models, method):
    base, fts = models
    est = hfsoup.inspect(fts, method=method, base=base).estimate
    assert est["local_bytes"] == sum(map(_weight_bytes, [base, *fts]))
    assert est["method"] == method and est["peak_memory_bytes"] > 0


def test_a_base_on_the_hub_is_downloaded_too(models, publish):
    base, fts = models
    repos = [publish(f)[0] for f in fts[:2]]
    base_repo, _ = publish(base, "base")
    est = hfsoup.inspect(repos, method="ties", base=base_repo).estimate
    assert est["download_bytes"] == sum(map(_weight_bytes, [base, *fts[:2]]))


def test_a_scored_merge_counts_theta0_and_tau_beside_the_live_model(models):
    base, fts = models
    model32 = _float32_bytes(fts[0])
    plain = hfsoup.inspect(fts, method="ties", base=base).estimate["peak_memory_bytes"]
    scored = hfsoup.inspect(fts, method="ties", base=base, scored=True).estimate
    # The live model, θ₀ and τ: three float32 copies of the model on top of the stream.
    assert scored["peak_memory_bytes"] >= plain + 3 * model32 - _weight_bytes(fts[0])
    assert "θ₀ and the merged task vector τ" in scored["assumes"][0]


def test_greedy_combine_counts_the_base_in_float32_whatever_k(models):
    base, fts = models
    model32 = _float32_bytes(fts[0])
    plain = hfsoup.inspect(fts, method="greedy").estimate["peak_memory_bytes"]
    combined = [hfsoup.inspect(fts[:k], method="greedy", base=base, combine="ties")
                .estimate["peak_memory_bytes"] for k in (2, 3)]  # fmt: skip
    assert combined[0] == combined[1]  # one tensor group per operator, not per ingredient
    assert combined[1] >= plain + model32


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--method", "ties"], "method 'ties' needs a base model θ₀: set base (--base)"),
        (["--method", "greedy", "--combine", "ties"], "method 'greedy' needs a base model"),
        (["--method", "uniform", "--base", "BASE"], "method 'uniform' takes no base model"),
        (["--method", "greedy", "--base", "BASE"], "method 'greedy' takes no base model"),
        (["--method", "learned", "--combine", "ties"], "combine does not apply"),
    ],
)
def test_a_base_missing_or_not_taken_is_one_line_exit_2(models, cli, flags, says):
    base, fts = models
    proc = cli("inspect", *fts, *[str(base) if f == "BASE" else f for f in flags])
    assert proc.returncode == 2
    assert says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
