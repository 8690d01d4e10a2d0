"""Task-vector merges with given coefficients (issue 17): each method against a plain-torch
reference over fully loaded state dicts, a sign conflict built on purpose, DARE's seeded masks,
mergekit's ties, the base's pinning and rebuild, and the errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from factories import load_state_dict, make_model, save_ingredient, tiny_bert_config

import hfsoup
from hfsoup.methods.task_vectors import dare_seed

SEEDS = (11, 12, 13)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A tiny 'pretrained' BERT and three fine-tunes of it (base + seeded noise)."""
    tmp = tmp_path_factory.mktemp("tv")
    base = tmp / "base"
    make_model(tiny_bert_config(), 0).save_pretrained(base)
    return base, [save_ingredient(tmp / f"ft{s}", tiny_bert_config(), seed=s) for s in SEEDS]


def _floats(sd: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in sd.items() if v.is_floating_point()]


def _taus(base: dict, fts: list[dict], name: str) -> torch.Tensor:
    return torch.stack([ft[name].float() - base[name].float() for ft in fts])


def _top(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Mergekit's magnitude sparsification: the int(density * n) largest |entries| by argsort."""
    flat = tau.flatten()
    k = max(1, int(density * flat.numel()))
    keep = torch.zeros_like(flat)
    keep[torch.argsort(flat.abs(), descending=True)[:k]] = 1
    return (flat * keep).view(tau.shape)


def _dare(tau: torch.Tensor, density: float, seed: int, i: int, name: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(dare_seed(seed, i, name))
    return tau * (torch.rand(tau.shape, generator=gen) < density) / density


def _disjoint(deltas: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    elected = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(deltas) == elected
    den = (w * agree).sum(0)
    return (deltas * agree).sum(0) / torch.where(den == 0, 1.0, den)


def reference(method: str, base: dict, fts: list[dict], *, weights=None, lam=1.0, density=0.5,
              alpha=0.5, seed=0) -> dict[str, torch.Tensor]:  # fmt: skip
    """The issue's definitions, on whole state dicts, tensor by tensor, in float32."""
    k = len(fts)
    w_list = weights or [1.0] * k
    out = {}
    for name, b in base.items():
        if not b.is_floating_point():
            out[name] = b
            continue
        b = b.float()
        w = torch.tensor(w_list).view(-1, *([1] * b.dim()))
        taus = _taus(base, fts, name)
        if method == "task_arithmetic":
            out[name] = b + lam * (w * taus).sum(0)
        elif method == "ties":
            trimmed = torch.stack([_top(t, density) for t in taus])
            out[name] = b + lam * _disjoint(trimmed * w, w)
        elif method == "dare_linear":
            dropped = torch.stack([_dare(t, density, seed, i, name) for i, t in enumerate(taus)])
            out[name] = b + lam * (w * dropped).sum(0) / w.sum()
        elif method == "dare_ties":
            dropped = torch.stack([_dare(t, density, seed, i, name) for i, t in enumerate(taus)])
            out[name] = b + lam * _disjoint(dropped * w, w)
        else:  # wise_ft
            wn = w / w.sum()
            soup = (wn * torch.stack([ft[name].float() for ft in fts])).sum(0)
            out[name] = (1 - alpha) * b + alpha * soup
    return out


def _max_diff(soup: dict, expected: dict) -> float:
    return max((soup[n].float() - expected[n]).abs().max().item() for n in _floats(expected))


CASES = [
    ("task_arithmetic", dict(lam=0.7), ["--lambda", "0.7"]),
    ("task_arithmetic", dict(lam=0.5, weights=[1.0, 2.0, 0.5]), ["--lambda", "0.5", "--weights", "1", "2", "0.5"]),
    ("ties", dict(lam=1.0, density=0.5), []),
    ("ties", dict(lam=0.8, density=0.2, weights=[1.0, 3.0, 1.0]), ["--lambda", "0.8", "--density", "0.2", "--weights", "1", "3", "1"]),
    ("dare_linear", dict(lam=1.2, density=0.3, seed=5), ["--lambda", "1.2", "--density", "0.3", "--seed", "5"]),
    ("dare_ties", dict(lam=1.0, density=0.6, seed=2), ["--density", "0.6", "--seed", "2"]),
    ("wise_ft", dict(alpha=0.3), ["--alpha", "0.3"]),
    ("wise_ft", dict(alpha=0.5, weights=[1.0, 1.0, 2.0]), ["--weights", "1", "1", "2"]),
]  # fmt: skip


@pytest.mark.parametrize(("method", "coefficients", "flags"), CASES)
def test_each_method_matches_its_plain_torch_reference(models, cli, tmp_path, method,
                                                       coefficients, flags):  # fmt: skip
    base, fts = models
    out = tmp_path / "soup"
    proc = cli("soup", *fts, "--method", method, "--base", base, *flags, "-o", out, "-q")
    assert proc.returncode == 0, proc.stderr
    expected = reference(method, load_state_dict(base), [load_state_dict(f) for f in fts],
                         **coefficients)  # fmt: skip
    soup = load_state_dict(out)
    assert soup.keys() == expected.keys()
    assert _max_diff(soup, expected) <= 1e-6


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_trimming_and_masks_are_per_whole_tensor_whatever_the_chunking(models, tmp_path,
                                                                        monkeypatch, method):  # fmt: skip
    """With chunks far smaller than a tensor, TIES' threshold and DARE's mask are still the
    whole tensor's (the stream gets whole tensors for these methods)."""
    import hfsoup.io.chunks as chunks

    base, fts = models
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 256)
    hfsoup.soup(fts, output=tmp_path / "s", method=method, merge={"base": base, "density": 0.3},
                progress=False)  # fmt: skip
    expected = reference(method, load_state_dict(base), [load_state_dict(f) for f in fts],
                         density=0.3)  # fmt: skip
    assert _max_diff(load_state_dict(tmp_path / "s"), expected) <= 1e-6


def test_task_arithmetic_is_the_same_in_row_chunks(models, tmp_path, monkeypatch):
    import hfsoup.io.chunks as chunks

    base, fts = models
    hfsoup.soup(fts, output=tmp_path / "a", method="task_arithmetic", merge={"base": base},
                progress=False)  # fmt: skip
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 256)
    hfsoup.soup(fts, output=tmp_path / "b", method="task_arithmetic", merge={"base": base},
                progress=False)  # fmt: skip
    a, b = load_state_dict(tmp_path / "a"), load_state_dict(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def conflict(tmp_path_factory) -> tuple[Path, list[Path], str]:
    """Two fine-tunes whose task vectors on one tensor have opposite signs on the same entries:
    τ₁ = +d, τ₂ = −2d on the first half of the rows; both +d on the other half."""
    tmp = tmp_path_factory.mktemp("conflict")
    name = "bert.encoder.layer.0.attention.self.query.weight"
    base_model = make_model(tiny_bert_config(), 0)
    base_model.save_pretrained(tmp / "base")
    d = torch.full_like(dict(base_model.named_parameters())[name], 0.01)
    half = d.shape[0] // 2
    paths = []
    for i, (first, second) in enumerate([(1.0, 1.0), (-2.0, 1.0)]):
        model = make_model(tiny_bert_config(), 0)
        with torch.no_grad():
            p = dict(model.named_parameters())[name]
            p[:half] += first * d[:half]
            p[half:] += second * d[half:]
        model.save_pretrained(tmp / f"ft{i}")
        paths.append(tmp / f"ft{i}")
    return tmp / "base", paths, name


def test_ties_sign_conflict_keeps_only_the_elected_sign(conflict, cli, tmp_path):
    base, fts, name = conflict
    out = tmp_path / "ties"
    proc = cli("soup", *fts, "--method", "ties", "--base", base, "--density", "1", "-o", out, "-q")
    assert proc.returncode == 0, proc.stderr
    b, soup = load_state_dict(base)[name], load_state_dict(out)[name]
    half = b.shape[0] // 2
    # Conflict rows: Σ τ = −d elects "−": only τ₂ = −2d agrees, so θ = θ₀ − 2d (not θ₀ − d/2).
    torch.testing.assert_close(soup[:half] - b[:half], torch.full_like(b[:half], -0.02),
                               rtol=0, atol=1e-6)  # fmt: skip
    # Agreeing rows: the mean of +d and +d.
    torch.testing.assert_close(soup[half:] - b[half:], torch.full_like(b[half:], 0.01),
                               rtol=0, atol=1e-6)  # fmt: skip
    # Tensors where every τ is 0: none agrees with the elected "+", θ = θ₀ exactly.
    other = "bert.encoder.layer.0.attention.self.key.weight"
    assert torch.equal(load_state_dict(out)[other], load_state_dict(base)[other])
    # Task arithmetic on the same models sums the conflict away instead: θ₀ − d.
    ta = tmp_path / "ta"
    assert cli("soup", *fts, "--method", "task_arithmetic", "--base", base, "-o", ta,
               "-q").returncode == 0  # fmt: skip
    torch.testing.assert_close(load_state_dict(ta)[name][:half] - b[:half],
                               torch.full_like(b[:half], -0.01), rtol=0, atol=1e-6)  # fmt: skip


def test_dare_is_reproducible_by_seed_and_keeps_density_of_the_entries(models, tmp_path):
    base, fts = models

    def make(out: str, seed: int) -> dict[str, torch.Tensor]:
        hfsoup.soup(fts[:1], output=tmp_path / out, method="dare_linear", seed=seed,
                    merge={"base": base, "density": 0.3}, progress=False)  # fmt: skip
        return load_state_dict(tmp_path / out)

    a, again, other = make("a", 4), make("b", 4), make("c", 5)
    assert all(torch.equal(a[k], again[k]) for k in a)
    assert any(not torch.equal(a[k], other[k]) for k in _floats(a))
    b0 = load_state_dict(base)
    kept = total = 0
    for name in _floats(b0):
        tau = load_state_dict(fts[0])[name] - b0[name]
        moved = a[name] - b0[name]
        nonzero = tau != 0
        kept += int(((moved != 0) & nonzero).sum())
        total += int(nonzero.sum())
    # ~6,000 entries: the kept fraction's standard deviation is ~0.006; 0.03 is 5 of them.
    assert total > 5_000
    assert abs(kept / total - 0.3) < 0.03
    card = (tmp_path / "a" / "README.md").read_text()
    assert "seed = 4" in card
    assert yaml.safe_load((tmp_path / "a" / "hfsoup_recipe.yaml").read_text())["seed"] == 4


def test_the_base_is_pinned_and_run_on_the_card_rebuilds_the_same_bytes(models, publish, hub,
                                                                         cli, tmp_path):  # fmt: skip
    base, fts = models
    base_repo, base_sha = publish(base, "base")
    repos = [publish(f)[0] for f in fts]
    out = tmp_path / "a"
    proc = cli("soup", *repos, "--method", "ties", "--base", base_repo, "--lambda", "0.9",
               "--density", "0.4", "-o", out, "-q")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    pinned = yaml.safe_load((out / "hfsoup_recipe.yaml").read_text())
    assert pinned["base"] == {"repo": base_repo, "revision": base_sha}
    assert (pinned["lambda"], pinned["density"]) == (0.9, 0.4)
    card = (out / "README.md").read_text()
    assert base_sha in card and "lambda = 0.9, density = 0.4" in card
    proc = cli("run", out / "README.md", "--output", tmp_path / "b", "-q")
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()


def _mergekit_python() -> str | None:
    """This interpreter, or $MERGEKIT_PYTHON (a venv made with --system-site-packages and
    ``pip install mergekit==0.1.5``, as benchmarks/bench_uniform.py --install-mergekit does)."""
    for python in (sys.executable, os.environ.get("MERGEKIT_PYTHON", "")):
        if python and Path(python).exists():
            probe = subprocess.run([python, "-c", "import mergekit.merge"], capture_output=True)
            if probe.returncode == 0:
                return python
    return None


def test_ties_equals_mergekit_ties(models, tmp_path):
    python = _mergekit_python()
    if python is None:
        pytest.skip("mergekit does not import here (pip install mergekit in a venv to run this)")
    base, fts = models
    config = {
        "merge_method": "ties", "base_model": str(base), "dtype": "float32",
        "parameters": {"normalize": True},
        "models": [{"model": str(f), "parameters": {"weight": 1.0, "density": 0.5}} for f in fts],
    }  # fmt: skip
    (tmp_path / "mk.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.run([python, "-m", "mergekit.scripts.run_yaml", str(tmp_path / "mk.yaml"),
                           str(tmp_path / "mk"), "--lazy-unpickle"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    if proc.returncode != 0:
        pytest.skip(f"mergekit could not run: {proc.stderr.strip().splitlines()[-1:]}")
    hfsoup.soup(fts, output=tmp_path / "ours", method="ties", merge={"base": base}, progress=False)
    ours, theirs = load_state_dict(tmp_path / "ours"), load_state_dict(tmp_path / "mk")
    common = [n for n in _floats(ours) if n in theirs]
    assert common == _floats(ours)
    assert max((ours[n] - theirs[n].float()).abs().max().item() for n in common) <= 1e-6


# --- errors: one line, exit 2, nothing written ---


def _refused(proc, out: Path, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and all(w in line for w in words), line
    assert not out.exists()


def test_a_method_that_needs_a_base_refuses_to_run_without_one(models, cli, tmp_path):
    _, fts = models
    out = tmp_path / "o"
    _refused(cli("soup", *fts, "--method", "ties", "-o", out), out, "needs a base", "--base")


def test_a_base_given_to_a_method_that_takes_none_is_refused(models, cli, tmp_path):
    base, fts = models
    out = tmp_path / "o"
    _refused(cli("soup", *fts, "--base", base, "-o", out), out, "takes no base")


def test_an_incompatible_base_is_refused_naming_the_tensor(models, cli, tmp_path):
    _, fts = models
    other = tmp_path / "other"
    make_model(tiny_bert_config(num_labels=3), 0).save_pretrained(other)
    out = tmp_path / "o"
    proc = cli("soup", *fts, "--method", "wise_ft", "--base", other, "-o", out)
    _refused(proc, out, "classifier.", "shape [3", "expected [2", "head")


@pytest.mark.reliability(
    "a --base whose head names the ingredients' labels in another order",
    "one line: 'base X orders its labels differently from Y (id2label ...)'; exit 2, nothing "
    "written (task vectors would subtract another label's head row)",
)
def test_a_base_with_the_labels_in_another_order_is_refused(models, cli, tmp_path):
    _, fts = models
    swapped = tmp_path / "swapped"
    config = tiny_bert_config(id2label={0: "positive", 1: "negative"},
                              label2id={"positive": 0, "negative": 1})  # fmt: skip
    make_model(config, 0).save_pretrained(swapped)
    out = tmp_path / "o"
    proc = cli("soup", *fts, "--method", "task_arithmetic", "--base", swapped, "-o", out)
    _refused(proc, out, "orders its labels differently")


@pytest.mark.parametrize("density", ["0", "1.5", "-0.1"])
def test_density_outside_zero_one_is_refused(models, cli, tmp_path, density):
    base, fts = models
    out = tmp_path / "o"
    proc = cli("soup", *fts, "--method", "ties", "--base", base, "--density", density, "-o", out)
    _refused(proc, out, "density")


def test_a_lambda_that_is_not_a_number_is_refused(models, cli, tmp_path):
    base, fts = models
    out = tmp_path / "o"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "task_arithmetic", "ingredients": [str(f) for f in fts],
                                      "base": str(base), "lambda": "strong",
                                      "output": {"dir": str(out)}}))  # fmt: skip
    _refused(cli("run", recipe), out, "lambda")
    _refused(cli("soup", *fts, "--method", "task_arithmetic", "--base", base, "--lambda", "nan",
                 "-o", out), out, "lambda")  # fmt: skip


def test_a_coefficient_for_another_method_is_refused(models, cli, tmp_path):
    base, fts = models
    out = tmp_path / "o"
    proc = cli("soup", *fts, "--method", "task_arithmetic", "--base", base, "--density", "0.5",
               "-o", out)  # fmt: skip
    _refused(proc, out, "density does not apply", "--density")


def test_lambda_is_refused_for_wise_ft_whose_only_scale_is_alpha(models, cli, tmp_path):
    base, fts = models
    out = tmp_path / "o"
    proc = cli("soup", *fts, "--method", "wise_ft", "--base", base, "--lambda", "0.5", "-o", out)
    _refused(proc, out, "lambda does not apply", "wise_ft", "--lambda")


def test_results_record_the_weights_as_given(models, tmp_path):
    base, fts = models
    hfsoup.soup(fts, output=tmp_path / "s", method="task_arithmetic", weights=[2, 1, 1],
                merge={"base": base, "lambda": 0.5}, progress=False)  # fmt: skip
    results = json.loads((tmp_path / "s" / "results.json").read_text())
    assert results["method"] == "task_arithmetic"
    assert [e["weight"] for e in results["ingredients"]] == [2.0, 1.0, 1.0]
    shutil.rmtree(tmp_path / "s")


def test_a_local_base_is_found_beside_the_soup_when_its_card_is_run(models, cli, tmp_path):
    base, fts = models
    out = tmp_path / "soups" / "a"
    assert (
        cli("soup", *fts, "--method", "dare_ties", "--base", base, "-o", out, "-q").returncode == 0
    )
    assert yaml.safe_load((out / "hfsoup_recipe.yaml").read_text())["base"].startswith("../")
    proc = cli("run", out / "README.md", "--output", tmp_path / "b", "--allow-local", "-q")
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()


def test_a_soup_recipe_naming_a_local_base_needs_allow_local(models, publish, hub, cli, tmp_path):
    base, fts = models
    repos = [publish(f)[0] for f in fts[:2]]
    out = tmp_path / "a"
    assert cli("soup", *repos, "--method", "ties", "--base", base, "-o", out, "-q").returncode == 0
    again = tmp_path / "b"
    _refused(cli("run", out / "README.md", "--output", again), again, "as the base model",
             "--allow-local")  # fmt: skip
