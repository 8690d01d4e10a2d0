"""Hostile local folders and options: repo-shaped folders that would shadow Hub repos, symlinks
out of an ingredient, folders far too big to be a model, --overwrite on what it must not
destroy, weights whose sum overflows, soups that overflow their dtype, absurd shard sizes."""

from __future__ import annotations

import os
import time

import pytest
import torch
import yaml
from conftest import run_cli
from factories import load_state_dict, save_ingredient, tiny_bert_config
from safetensors.torch import load_file, save_file
from test_errors import assert_nothing_written, assert_one_line_error

from hfsoup.compute.combine import normalise_weights
from hfsoup.errors import NonFiniteWeightsError
from hfsoup.io import hub as hub_module
from hfsoup.io.hub import LocalSource, parse_ingredient, resolve
from hfsoup.io.tensors import index_ingredient
from hfsoup.report.outputs import write_weights

reliability = pytest.mark.reliability


def plain_average(*folders, weights=None) -> dict[str, torch.Tensor]:
    """The weighted mean of fully loaded state dicts, in float64 then float32 (independent)."""
    dicts = [load_state_dict(f) for f in folders]
    weights = weights or [1.0] * len(dicts)
    total = sum(weights)
    return {
        name: sum(
            d[name].double() * (w / total) for d, w in zip(dicts, weights, strict=True)
        ).float()
        for name in dicts[0]
    }


def assert_same_tensors(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name].float(), tensor, rtol=1e-6, atol=1e-6)


def front_matter(readme) -> dict:
    return yaml.safe_load(readme.read_text(encoding="utf-8").split("---")[1])


# --- 1. a folder named like a repo does not replace the Hub repo -----------------------------


@reliability(
    "Folder in the working directory named like a Hub repo (org/name)",
    "nothing: 'org/name' is the Hub repo, whatever folder has that name; './org/name' is the folder",
)
def test_repo_shaped_folder_does_not_shadow_the_hub_repo(tmp_path, cli, publish, monkeypatch):
    config = tiny_bert_config()
    published = save_ingredient(tmp_path / "published", config, seed=1)
    repo = publish(published)[0]
    impostor = save_ingredient(tmp_path / "work" / repo, config, seed=7)
    monkeypatch.chdir(tmp_path / "work")

    proc = cli("soup", repo, "--output", tmp_path / "hub-soup", "-q")
    assert proc.returncode == 0, proc.stderr
    assert_same_tensors(load_state_dict(tmp_path / "hub-soup"), load_state_dict(published))
    assert front_matter(tmp_path / "hub-soup" / "README.md")["base_model"] == [repo]

    proc = cli("soup", f"./{repo}", "--output", tmp_path / "local-soup", "-q")
    assert proc.returncode == 0, proc.stderr
    assert_same_tensors(load_state_dict(tmp_path / "local-soup"), load_state_dict(impostor))


@reliability(
    "Repo-shaped ingredient with no such Hub repo, but a local folder of that name",
    "a warning: 'hfsoup: no Hub repo org/name; using the local folder ./org/name — write ./org/name to "
    "say so'; the soup is made and its card marks the ingredient 'local folder, not on the Hub'",
)
def test_repo_shaped_folder_is_a_fallback_only_when_the_hub_has_no_such_repo(tmp_path, publish):
    config = tiny_bert_config()
    on_hub = save_ingredient(tmp_path / "on-hub", config, seed=1)
    repo = publish(on_hub)[0]
    local = save_ingredient(tmp_path / "work" / "test-org" / "never-published", config, seed=2)

    proc = run_cli("soup", repo, "test-org/never-published", "--output", tmp_path / "soup", "-q",
                   cwd=tmp_path / "work")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == (
        "hfsoup: no Hub repo test-org/never-published; using the local folder ./test-org/never-published"
        " — write ./test-org/never-published to say so"
    )
    assert_same_tensors(load_state_dict(tmp_path / "soup"), plain_average(on_hub, local))
    readme = tmp_path / "soup" / "README.md"
    assert front_matter(readme)["base_model"] == [repo]
    row = next(line for line in readme.read_text().splitlines() if "never-published" in line)
    assert "local folder, not on the Hub" in row
    # The card's recipe names the folder that was read (relative to the soup), not a repo ID the
    # Hub may gain later.
    pinned = yaml.safe_load((tmp_path / "soup" / "hfsoup_recipe.yaml").read_text())
    assert pinned["ingredients"][1] == "../work/test-org/never-published"
    assert (tmp_path / "soup" / pinned["ingredients"][1]).resolve() == local.resolve()


@reliability(
    "Repo-shaped ingredient whose Hub lookup fails for another reason (access, network)",
    "one line: the Hub's error, plus '(a local folder ./org/name exists: write ./org/name to use "
    "it)'; the folder is not read",
)
def test_repo_shaped_folder_is_not_used_when_the_hub_lookup_fails(
    tmp_path, cli, faulty_hub, repo_id, monkeypatch
):
    name = repo_id("private")
    save_ingredient(tmp_path / "work" / name, tiny_bert_config(), seed=1)
    monkeypatch.chdir(tmp_path / "work")
    faulty_hub.add_fault(method="GET", path=f"/api/models/{name}", status=403, times=None)
    proc = cli("soup", name, "--output", tmp_path / "soup", "-q")
    assert_one_line_error(proc, name, f"a local folder ./{name} exists: write ./{name} to use it")
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize(
    "text", ["./org/name", "../work/org/name", "org/name/..", "~/org/name", "."]
)
def test_an_ingredient_written_as_a_path_is_local(tmp_path, monkeypatch, text):
    (tmp_path / "work" / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("HOME", str(tmp_path / "work"))
    spec = parse_ingredient(text)
    assert spec.path is not None and spec.repo is None


def test_a_repo_shaped_name_stays_a_repo_id_beside_a_folder(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    (tmp_path / "gpt2").mkdir()
    monkeypatch.chdir(tmp_path)
    spec = parse_ingredient("org/name")
    assert (spec.repo, spec.path, spec.local_fallback) == ("org/name", None, tmp_path / "org/name")
    assert parse_ingredient("gpt2").repo == "gpt2"


# --- 2. symlinks out of a local ingredient ---------------------------------------------------


@reliability(
    "Local ingredient whose README.md is a symlink out of the folder",
    "one line: ''README.md' points outside DIR' (IngredientNotFoundError); nothing written",
)
def test_a_readme_symlink_out_of_the_folder_is_refused(tmp_path, cli):
    secret = tmp_path / "secret.md"
    secret.write_text("---\nlicense: stolen-secret\n---\nprivate notes\n")
    folder = save_ingredient(tmp_path / "ing", tiny_bert_config(), seed=1)
    (folder / "README.md").symlink_to(secret)
    proc = cli("soup", folder, "--output", tmp_path / "soup", "-q")
    assert_one_line_error(proc, "'README.md' points outside", str(folder))
    assert_nothing_written(tmp_path)


@reliability(
    "Local ingredient whose tokenizer / processor file is a symlink out of the folder",
    "one line: ''vocab.txt' points outside DIR' (IngredientNotFoundError); nothing written",
)
def test_an_aux_file_symlink_out_of_the_folder_is_refused(tmp_path, cli):
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY\n")
    folder = save_ingredient(tmp_path / "ing", tiny_bert_config(), seed=1)
    (folder / "vocab.txt").symlink_to(secret)
    proc = cli("soup", folder, "--output", tmp_path / "soup", "-q")
    assert_one_line_error(proc, "'vocab.txt' points outside", str(folder))
    assert_nothing_written(tmp_path)


def test_a_symlinked_folder_is_not_listed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "tokenizer.json").write_text("{}")
    folder = save_ingredient(tmp_path / "ing", tiny_bert_config(), seed=1)
    (folder / "linked").symlink_to(outside, target_is_directory=True)
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    assert not [name for name in LocalSource(folder).files if "/" in name]


# --- 3. folders far too big to be a model ---------------------------------------------------


@reliability(
    "Ingredient that is / (or any folder far too big to be a model)",
    "one line within seconds: 'ingredient /: more than 10,000 files and folders; not a model "
    "folder' (IngredientSpecError); nothing written",
)
def test_the_root_folder_as_an_ingredient_fails_at_once(tmp_path, cli):
    start = time.monotonic()
    proc = cli("soup", "/", "--output", tmp_path / "soup", "-q")
    assert time.monotonic() - start < 60
    assert_one_line_error(proc, "ingredient /", "not a model folder")
    assert_nothing_written(tmp_path)


def test_a_folder_with_too_many_files_is_refused(tmp_path, cli, monkeypatch):
    monkeypatch.setattr("hfsoup.io.sources.MAX_LOCAL_ENTRIES", 40)
    folder = save_ingredient(tmp_path / "ing", tiny_bert_config(), seed=1)
    for i in range(41):
        (folder / f"junk-{i}.txt").write_text("x")
    proc = cli("soup", folder, "--output", tmp_path / "soup", "-q")
    assert_one_line_error(proc, "more than 40 files and folders", "not a model folder")


def test_a_folder_nested_too_deep_is_refused(tmp_path, cli):
    folder = save_ingredient(tmp_path / "ing", tiny_bert_config(), seed=1)
    (folder / "/".join("d" * (hub_module.MAX_LOCAL_DEPTH + 1))).mkdir(parents=True)
    proc = cli("soup", folder, "--output", tmp_path / "soup", "-q")
    assert_one_line_error(proc, f"nested more than {hub_module.MAX_LOCAL_DEPTH} deep")


# --- 4. --overwrite on what it must not destroy ---------------------------------------------


def _protected(tmp_path, monkeypatch, kind):
    """(output folder, what must survive) for each kind of folder --overwrite may not replace."""
    ingredient = tmp_path / "models" / "ing"
    if kind == "the ingredient":
        return ingredient, ingredient
    if kind == "a parent of the ingredient":
        return tmp_path / "models", ingredient
    if kind in ("the HF cache", "a folder holding the HF cache"):
        cache = tmp_path / "cache" / "hub"
        (cache / "models--org--x").mkdir(parents=True)
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
        return (cache if kind == "the HF cache" else cache.parent), cache / "models--org--x"
    if kind == "the home folder":
        (tmp_path / "home" / ".ssh").mkdir(parents=True)
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        return tmp_path / "home", tmp_path / "home" / ".ssh"
    if kind == "a parent of the working directory":
        (tmp_path / "project" / "src").mkdir(parents=True)
        monkeypatch.chdir(tmp_path / "project" / "src")
        return tmp_path / "project", tmp_path / "project" / "src"
    raise AssertionError(kind)


@reliability(
    "--overwrite on a folder that is or holds an ingredient, the HF cache, the home folder or the "
    "working directory",
    "one line: 'output folder DIR holds the ingredient X; choose another output' / '... holds the "
    "HF cache (...); it is not replaced' (OutputExistsError), before anything is read; the folder "
    "is untouched",
)
@pytest.mark.parametrize(
    "kind",
    ["the ingredient", "a parent of the ingredient", "the HF cache", "a folder holding the HF cache",
     "the home folder", "a parent of the working directory"],
)  # fmt: skip
def test_overwrite_refuses_to_destroy_inputs_and_precious_folders(tmp_path, cli, monkeypatch, kind):
    ingredient = save_ingredient(tmp_path / "models" / "ing", tiny_bert_config(), seed=1)
    target, survivor = _protected(tmp_path, monkeypatch, kind)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    # A Hub repo that does not exist: the refusal must come before any ingredient is resolved.
    proc = cli("soup", ingredient, "test-org/does-not-exist-x", "--output", target,
               "--overwrite", "-q")  # fmt: skip
    assert_one_line_error(proc, f"output folder {target.resolve()}")
    assert "repository not found" not in proc.stderr
    assert survivor.exists()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@reliability(
    "Output folder that is a mount point (with or without --overwrite)",
    "one line: 'output folder DIR is a mount point, which cannot be replaced; write the soup into "
    "a folder inside it' (OutputExistsError); nothing written",
)
@pytest.mark.parametrize("overwrite", [False, True], ids=["empty", "overwrite"])
def test_a_mount_point_as_the_output_is_refused(tmp_path, cli, monkeypatch, overwrite):
    ingredient = save_ingredient(tmp_path / "ing", tiny_bert_config(), seed=1)
    mount = tmp_path / "mnt"
    mount.mkdir()
    if overwrite:
        (mount / "old.txt").write_text("kept")
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: str(p) == str(mount) or real_ismount(p))
    flags = ("--overwrite",) if overwrite else ()
    proc = cli("soup", ingredient, "--output", mount, "-q", *flags)
    assert_one_line_error(proc, f"output folder {mount} is a mount point")
    assert sorted(p.name for p in mount.iterdir()) == (["old.txt"] if overwrite else [])
    assert not [p for p in tmp_path.iterdir() if ".hfsoup" in p.name]


def test_overwrite_still_replaces_an_ordinary_previous_soup(tmp_path, cli):
    ingredient = save_ingredient(tmp_path / "ing", tiny_bert_config(), seed=1)
    (tmp_path / "soup").mkdir()
    (tmp_path / "soup" / "stale.txt").write_text("old")
    proc = cli("soup", ingredient, "--output", tmp_path / "soup", "--overwrite", "-q")
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "soup" / "stale.txt").exists()
    assert_same_tensors(load_state_dict(tmp_path / "soup"), load_state_dict(ingredient))


# --- 5. weights whose sum overflows; soups that overflow their dtype ------------------------


@reliability(
    "Weights each finite whose sum overflows (--weights 1e308 1e308)",
    "nothing: weights are scaled by the largest before normalising; the soup equals --weights 1 1",
)
def test_weights_whose_sum_overflows_are_normalised_safely(tmp_path, cli):
    config = tiny_bert_config()
    a = save_ingredient(tmp_path / "a", config, seed=1)
    b = save_ingredient(tmp_path / "b", config, seed=2)
    proc = cli("soup", a, b, "--weights", "1e308", "1e308", "--output", tmp_path / "big", "-q")
    assert proc.returncode == 0, proc.stderr
    big = load_state_dict(tmp_path / "big")
    assert_same_tensors(big, plain_average(a, b))
    assert any(bool(t.abs().sum() > 0) for t in big.values())
    proc = cli("soup", a, b, "--weights", "1", "1", "--output", tmp_path / "one", "-q")
    assert proc.returncode == 0, proc.stderr
    one = load_state_dict(tmp_path / "one")
    assert all(torch.equal(big[k], one[k]) for k in one)


def test_normalised_weights_sum_to_one_at_the_edges_of_float():
    assert normalise_weights(2, [1e308, 1e308]) == [0.5, 0.5]
    assert normalise_weights(3, [1.7e308, 1.7e308, 1.7e308]) == pytest.approx([1 / 3] * 3)
    assert normalise_weights(2, [5e-324, 5e-324]) == [0.5, 0.5]
    assert sum(normalise_weights(2, [1e308, 1.0])) == pytest.approx(1.0)


def _large_valued(tmp_path, name, seed, value):
    folder = save_ingredient(tmp_path / name, tiny_bert_config(), seed=seed)
    tensors = load_file(folder / "model.safetensors")
    tensors["classifier.bias"] = torch.full_like(tensors["classifier.bias"], value)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@reliability(
    "Soup whose average overflows its output dtype (float32 ingredients written as float16 above "
    "65504)",
    "one line: 'the soup's tensor 'X' holds NaN or Inf values as float16 (its average overflows "
    "that dtype) ...' (NonFiniteWeightsError); nothing written; --allow-nonfinite writes it",
)
def test_a_soup_that_overflows_its_dtype_is_refused(tmp_path, cli):
    a = _large_valued(tmp_path, "a", 1, 70000.0)
    b = _large_valued(tmp_path, "b", 2, 80000.0)
    proc = cli("soup", a, b, "--dtype", "float16", "--output", tmp_path / "soup", "-q")
    assert_one_line_error(proc, "'classifier.bias'", "float16", "--allow-nonfinite")
    assert_nothing_written(tmp_path)
    proc = cli("soup", a, b, "--dtype", "float16", "--allow-nonfinite",
               "--output", tmp_path / "soup", "-q")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert torch.isinf(load_state_dict(tmp_path / "soup")["classifier.bias"]).all()
    # In float32 the same average is finite, and written.
    proc = cli("soup", a, b, "--output", tmp_path / "wide", "-q")
    assert proc.returncode == 0, proc.stderr
    bias = load_state_dict(tmp_path / "wide")["classifier.bias"]
    assert torch.equal(bias, torch.full_like(bias, 75000.0))


def test_greedy_and_learned_writes_refuse_a_nonfinite_soup(tmp_path):
    """Greedy and learned soups write through outputs.write_weights: the same check applies."""
    folder = save_ingredient(tmp_path / "ing", tiny_bert_config(), seed=1)
    index = index_ingredient(resolve(parse_ingredient(str(folder))))
    names = sorted(index.tensors)
    state = load_state_dict(folder)

    def tensors_of(wanted):
        return {
            n: (state[n].half() * 1e6 if n == "classifier.weight" else state[n]) for n in wanted
        }

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(NonFiniteWeightsError, match="'classifier.weight'.*float16"):
        write_weights(out, [index], [names], tensors_of, torch.float16)
    assert not list(out.iterdir())
    write_weights(out, [index], [names], tensors_of, torch.float16, allow_nonfinite=True)
    assert (out / "model.safetensors").is_file()


# --- 6. absurd --max-shard-size ------------------------------------------------------------


@reliability(
    "--max-shard-size that overflows, is negative or zero (1e400GB, 99999999999999999999999PB, "
    "-5GB, 0)",
    "one line: 'output.max_shard_size: size '1e400GB' is too large (at most 8PiB)' / 'size must "
    "be positive' (RecipeError); nothing written",
)
@pytest.mark.parametrize(
    ("size", "says"),
    [("1e400GB", "too large"), ("99999999999999999999999PB", "too large"), ("inf", "too large"),
     ("-5GB", "must be positive"), ("0", "must be positive"), ("nan", "must be positive")],
)  # fmt: skip
def test_an_absurd_max_shard_size_is_one_line(tmp_path, cli, size, says):
    ingredient = save_ingredient(tmp_path / "ing", tiny_bert_config(), seed=1)
    proc = cli("soup", ingredient, f"--max-shard-size={size}", "--output", tmp_path / "soup", "-q")
    assert_one_line_error(proc, "max_shard_size", says)
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("size", [-5, 0, 10**40])
def test_a_recipe_max_shard_size_in_bytes_is_checked_too(tmp_path, cli, size):
    ingredient = save_ingredient(tmp_path / "ing", tiny_bert_config(), seed=1)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "ingredients": [str(ingredient)],
        "output": {"dir": str(tmp_path / "soup"), "max_shard_size": size},
    }))  # fmt: skip
    proc = cli("run", recipe, "-q")
    assert_one_line_error(proc, "max_shard_size")
    assert_nothing_written(tmp_path)
