"""Recipes (strict keys, line numbers) and the model card (metadata, pinned SHAs, rebuild)."""

from __future__ import annotations

import pytest
import yaml
from conftest import run_cli
from factories import load_state_dict

import hfsoup
from hfsoup.errors import RecipeError
from hfsoup.recipe import load_recipe, parse_recipe


def test_unknown_recipe_key_is_named_with_its_line():
    text = "name: x\ningredients:\n  - org/a\n  - {repo: org/b, revison: v1}\n"
    with pytest.raises(RecipeError, match=r"<recipe>:4: unknown key 'ingredients.1.revison'"):
        parse_recipe(text)


def test_wrong_type_is_named_with_its_line():
    text = "ingredients: [org/a]\noutput:\n  dir: out\n  private: perhaps\n"
    with pytest.raises(RecipeError, match=r":4: output.private"):
        parse_recipe(text)


def test_unknown_method_is_refused():
    with pytest.raises(RecipeError, match="method"):
        parse_recipe("method: soupy\ningredients: [org/a]\n")


def test_string_and_mapping_ingredients_are_equivalent():
    recipe = parse_recipe("ingredients: ['org/a@v1', {repo: org/b, revision: main}]\n")
    assert [(e.repo, e.revision) for e in recipe.ingredients] == [
        ("org/a", "v1"),
        ("org/b", "main"),
    ]


@pytest.mark.parametrize(
    "path",
    ["recipes/uniform.yaml", "recipes/weighted.yaml", "recipes/glue_sst2_greedy.yaml",
     "recipes/beans_greedy.yaml", "recipes/tweets_greedy.yaml"],
)  # fmt: skip
def test_shipped_recipes_validate(path):
    from pathlib import Path

    recipe = load_recipe(Path(__file__).parent.parent / path)
    assert recipe.ingredients


def test_card_metadata_is_valid_and_pins_shas(hub, bert_soup_ingredients, tmp_path, api):
    from huggingface_hub import ModelCard

    repos, _ = bert_soup_ingredients
    hfsoup.soup(repos, output=tmp_path / "soup", name="tiny-soup", progress=False)
    card = ModelCard.load(tmp_path / "soup" / "README.md")
    meta = card.data.to_dict()
    assert meta["base_model"] == repos
    assert meta["base_model_relation"] == "merge"
    assert {"hfsoup", "model-soup", "merge"} <= set(meta["tags"])
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-classification"
    for repo in repos:
        assert api.model_info(repo).sha in card.text


def test_license_is_recorded_only_when_ingredients_agree(hub, tmp_path, publish):
    from factories import save_ingredient, tiny_bert_config
    from huggingface_hub import ModelCard

    dirs = [save_ingredient(tmp_path / f"l{i}", tiny_bert_config(), seed=i) for i in range(3)]
    for d, lic in zip(dirs, ["mit", "mit", "apache-2.0"], strict=True):
        (d / "README.md").write_text(f"---\nlicense: {lic}\n---\n# ft\n")
    repos = [publish(d)[0] for d in dirs]
    hfsoup.soup(repos[:2], output=tmp_path / "agree", progress=False)
    hfsoup.soup(repos, output=tmp_path / "differ", progress=False)
    assert ModelCard.load(tmp_path / "agree" / "README.md").data.license == "mit"
    assert ModelCard.load(tmp_path / "differ" / "README.md").data.license is None


def test_rendering_the_card_makes_no_network_call(
    hub, bert_soup_ingredients, tmp_path, monkeypatch
):
    from hfsoup import api as soup_api
    from hfsoup.report.card import CardInfo, render_card

    repos, _ = bert_soup_ingredients
    indexes = soup_api.load_ingredients(repos)
    recipe = soup_api.pin_recipe(parse_recipe(f"ingredients: {repos}\n"), indexes)
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("network call while rendering the card")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    text = render_card(CardInfo(recipe=recipe, rows=[], config={}, licenses=[]))
    assert "hfsoup-recipe" in text


def test_run_on_the_card_rebuilds_the_same_soup(hub, bert_soup_ingredients, tmp_path, api):
    repos, _ = bert_soup_ingredients
    hfsoup.soup([repos[0], f"{repos[1]}@main", repos[2]], output=tmp_path / "a", progress=False)
    # Move main of one ingredient: the pinned recipe must still read the old commit.
    from factories import save_ingredient, tiny_bert_config

    newer = save_ingredient(tmp_path / "newer", tiny_bert_config(), seed=77)
    api.upload_folder(repo_id=repos[1], folder_path=str(newer), commit_message="moved on")
    proc = run_cli("run", str(tmp_path / "a" / "README.md"), "--output", str(tmp_path / "b"), "-q")
    assert proc.returncode == 0, proc.stderr
    a, b = load_state_dict(tmp_path / "a"), load_state_dict(tmp_path / "b")
    assert all((a[k] == b[k]).all() for k in a)
    pinned = yaml.safe_load((tmp_path / "a" / "hfsoup_recipe.yaml").read_text())
    assert all(len(e["revision"]) == 40 for e in pinned["ingredients"])


def test_run_a_recipe_file(hub, bert_soup_ingredients, tmp_path):
    repos, dirs = bert_soup_ingredients
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "ingredients": repos,
                                      "output": {"dir": str(tmp_path / "out")}}))  # fmt: skip
    proc = run_cli("run", str(recipe), "-q", "--json")
    assert proc.returncode == 0, proc.stderr
    import json

    assert json.loads(proc.stdout)["method"] == "uniform"
    assert (tmp_path / "out" / "model.safetensors").is_file()
