"""Learned soups: α moves towards the better ingredient, the memory and stream paths agree, the
stream path's peak memory is flat in k, and the written soup is Σ α_i θ_i by plain torch."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from factories import load_state_dict, tiny_bert_config
from greedy_fixtures import accuracy, publish_sentiment

import hfsoup
from hfsoup.errors import InsufficientMemoryError, RecipeError

# One good fine-tune and two barely trained ones, all from the same init.
RUNS = [{"lr": 1e-2, "steps": 100}, {"lr": 1e-3, "steps": 8}, {"lr": 1e-3, "steps": 8}]
GOOD = 0


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory, hub):
    from huggingface_hub import HfApi

    return publish_sentiment(
        HfApi(endpoint=hub.url), tmp_path_factory.mktemp("learned"), RUNS,
        dataset="test-org/keyword-sentiment-learned", prefix="test-org/learned-ft",
        seeds=(11, 12, 13), sizes=(300, 160, 160), batch_size=48,
    )  # fmt: skip


def learn_both_paths(s, **options):
    """α and β learned on each path, over the same live session and scorer."""
    from hfsoup.api import load_ingredients
    from hfsoup.io.tensors import FLOAT_DTYPES
    from hfsoup.methods.greedy import SoupSession
    from hfsoup.methods.greedy_run import make_scorer
    from hfsoup.methods.learned import WHOLE_MODEL, layer_groups, learn
    from hfsoup.tasks.task import resolve_task

    indexes = load_ingredients(s["repos"])
    scorer = make_scorer(resolve_task(s["task"]), indexes[0], progress=False)
    floats = [n for n, r in indexes[0].tensors.items() if r.dtype in FLOAT_DTYPES]
    by_layer = options.pop("by_layer")
    groups = layer_groups(floats) if by_layer else {WHOLE_MODEL: floats}
    return {
        path: learn(SoupSession(indexes), scorer, groups=groups, path=path, **options)
        for path in ("memory", "stream")
    }


def test_alpha_moves_towards_the_clearly_better_ingredient(hub, sentiment, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hfsoup")  # progress lines go to the hfsoup logger
    result = hfsoup.soup(sentiment["repos"], output=tmp_path / "soup", method="learned",
                         task=sentiment["task"], learned={"epochs": 3, "lr": 0.1})  # fmt: skip
    learned = result.results["learned"]
    scores = [r["scores"]["validation"]["accuracy"] for r in result.results["ingredients"]]
    assert max(range(3), key=scores.__getitem__) == GOOD and scores[GOOD] > max(scores[1:]) + 0.1
    alpha = learned["alpha"]
    assert max(range(3), key=alpha.__getitem__) == GOOD
    assert alpha[GOOD] > 1 / 3 + 0.1, alpha
    assert sum(alpha) == pytest.approx(1.0, abs=1e-6)
    assert learned["loss"][-1] < learned["loss"][0]
    assert learned["path"] == "memory"  # both fit; the memory path is chosen
    plan = [f"hfsoup: {m}" for m in caplog.messages if "path (" in m]
    assert len(plan) == 1 and plan[0].startswith(
        "hfsoup: learned soup: memory path (all 3 ingredients fit): needs ~"
    ), plan
    assert "; stream path: ~" in plan[0] and " s" in plan[0]


@pytest.mark.parametrize(
    "options",
    [{"by_layer": True, "param": "softmax"}, {"by_layer": False, "param": "free"}],
    ids=["by-layer-softmax", "whole-model-free"],
)
def test_memory_and_stream_paths_learn_the_same_alpha(hub, sentiment, options):
    both = learn_both_paths(sentiment, epochs=2, lr=0.05, batch_size=20, **options)
    memory, stream = both["memory"], both["stream"]
    assert memory.steps == stream.steps == 2 * 8
    moved = (memory.weights - 1 / 3).abs().max().item()
    assert moved > 0.05  # the weights did move, so agreeing is not trivial
    assert (memory.weights - stream.weights).abs().max().item() < 1e-5  # measured: ~1e-7
    assert memory.beta == pytest.approx(stream.beta, abs=1e-5)
    assert memory.losses == pytest.approx(stream.losses, rel=1e-5)


def test_written_soup_is_alpha_weighted_sum_and_results_are_recorded(hub, sentiment, tmp_path):
    out = tmp_path / "soup"
    hfsoup.soup(sentiment["repos"], output=out, method="learned", task=sentiment["task"],
                learned={"by_layer": True, "path": "stream", "epochs": 1}, progress=False)  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    learned = results["learned"]
    assert {"alpha", "beta", "groups", "path"} <= learned.keys() and learned["path"] == "stream"
    groups = learned["groups"]
    assert list(groups)[:2] == ["embeddings", "layer.0"] and "layer.1" in groups
    assert "classifier.weight" in groups["head"] and "bert.pooler.dense.weight" in groups["head"]
    assert set(results["table"]) == {"best_individual", "uniform_soup", "learned_soup_by_layer",
                                     "ensemble", "greedy_ensemble"}  # fmt: skip
    # The soup is Σ_i α_il θ_il, computed here from fully loaded checkpoints.
    sds = [load_state_dict(d) for d in sentiment["dirs"]]
    written = load_state_dict(out)
    for group, names in groups.items():
        alpha = [row[group] for row in learned["alpha"]]
        assert sum(alpha) == pytest.approx(1.0, abs=1e-6)
        for name in names:
            expected = sum(a * sd[name] for a, sd in zip(alpha, sds, strict=True))
            assert torch.allclose(written[name], expected, atol=1e-6), name
    floats = {n for n, t in written.items() if t.is_floating_point()}
    assert floats == {n for names in groups.values() for n in names}
    assert all(torch.equal(written[n], sds[0][n]) for n in written.keys() - floats)
    # Its reported test score is what an independent evaluation of the written soup gives.
    test = accuracy(written, out, sentiment["splits"]["test"], sentiment["tok"])
    assert results["table"]["learned_soup_by_layer"]["test"]["accuracy"] == pytest.approx(test)
    card = (out / "README.md").read_text()
    assert "learned_alpha.png" in card and "| ingredient | embeddings | layer.0 |" in card
    assert (out / "learned_alpha.png").stat().st_size > 1000
    assert "by_layer: true" in (out / "hfsoup_recipe.yaml").read_text()


def test_cli_flags_reach_the_learned_soup(hub, sentiment, tmp_path, capsys):
    import yaml

    from hfsoup.cli import main

    task = tmp_path / "task.yaml"
    task.write_text(yaml.safe_dump(sentiment["task"]))
    code = main(["soup", *sentiment["repos"], "--method", "learned", "--task", str(task),
                 "--learned-path", "stream", "--learned-epochs", "1", "--learned-lr", "0.2",
                 "--learned-batch-size", "40", "--alpha-param", "free",
                 "--output", str(tmp_path / "s"), "-q", "--json"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    learned = json.loads(capsys.readouterr().out)["learned"]
    assert (learned["path"], learned["param"], learned["epochs"]) == ("stream", "free", 1)
    assert (learned["lr"], learned["batch_size"], learned["steps"]) == (0.2, 40, 4)
    assert not learned["by_layer"] and list(learned["groups"]) == ["all"]


def test_refuses_with_numbers_when_neither_path_fits(hub, sentiment, tmp_path, capsys):
    from hfsoup.cli import main

    code = main(["soup", *sentiment["repos"], "--method", "learned", "--by-layer",
                 "--dataset", sentiment["task"]["dataset"], "--memory-budget", "20KB",
                 "--output", str(tmp_path / "s"), "-q"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "does not fit" in err and "memory path needs ~" in err and "stream path ~" in err
    assert "20.0 KB available (memory_budget)" in err
    assert not (tmp_path / "s").exists()


def test_path_plan_prefers_memory_then_stream_then_refuses():
    from hfsoup.methods.learned import plan_path

    def plan(available, forced="auto"):
        return plan_path(k=8, model_bytes=100, read_ahead=10, activations=5,
                         available=available, available_from="test", forced=forced)  # fmt: skip

    assert plan(10_000).path == "memory" and plan(10_000).needs == {"memory": 1105, "stream": 215}
    assert plan(1_000).path == "stream"
    assert plan(10_000, forced="stream").path == "stream"
    with pytest.raises(InsufficientMemoryError, match=r"memory path: needs ~1.1 KB, 1.0 KB"):
        plan(1_000, forced="memory")
    with pytest.raises(
        InsufficientMemoryError, match="memory path needs ~1.1 KB, stream path ~215"
    ):
        plan(200)


def test_layer_groups_from_parameter_names():
    from hfsoup.methods.learned import layer_groups

    names = ["transformer.wte.weight", "transformer.h.10.attn.c_attn.weight", "score.weight",
             "transformer.h.2.mlp.c_fc.bias", "transformer.ln_f.weight",
             "vit.embeddings.cls_token", "distilbert.transformer.layer.0.ffn.lin1.weight",
             "pre_classifier.weight"]  # fmt: skip
    groups = layer_groups(names)
    assert list(groups) == ["embeddings", "layer.0", "layer.2", "layer.10", "other", "head"]
    assert groups["head"] == ["score.weight", "pre_classifier.weight"]
    assert groups["other"] == ["transformer.ln_f.weight"]


def test_learned_recipe_keys_are_checked():
    from hfsoup.recipe import parse_recipe

    recipe = parse_recipe("method: learned\ningredients: [a/b, a/c]\n"
                          "learned: {by_layer: true, epochs: 2}\n")  # fmt: skip
    assert recipe.learned.by_layer and recipe.learned.epochs == 2 and recipe.learned.lr == 0.05
    with pytest.raises(RecipeError, match=r":3: unknown key 'learned.epoch'"):
        parse_recipe("method: learned\ningredients: [a/b]\nlearned: {epoch: 2}\n")
    with pytest.raises(RecipeError, match="learned options apply to method 'learned'"):
        hfsoup.run(parse_recipe("ingredients: [a/b]\nlearned: {epochs: 2}\noutput: {dir: x}\n"))


# Peak RSS growth (KB) of learned soups, each in a child forked from one warmed-up interpreter
# (imports, dataset cache, metric and allocator pools are paid once, before any measurement).
_PROBE = """
import json, os, sys, traceback
import torch
torch.set_num_threads(1)
import hfsoup
dirs, data, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
task = {"dataset": {"path": "parquet", "data_files": data}, "selection_split": "validation",
        "report_splits": ["test"], "batch_size": 32}
def soup(k, path, name=""):
    hfsoup.soup(dirs[:k], output=f"{out}/{name or path}{k}", method="learned", task=task,
                learned={"path": path, "epochs": 1}, progress=False)
def hwm_kb():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
soup(2, "stream", "warm")
growth = {}
for k, path in [(2, "stream"), (6, "stream"), (6, "memory")]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS high-water mark
            before = hwm_kb()
            soup(k, path)
            os.write(write, str(hwm_kb() - before).encode())
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    os.close(write)
    with os.fdopen(read) as f:
        growth[f"{path}{k}"] = f.read()
    assert os.waitpid(pid, 0)[1] == 0, (k, path)
    growth[f"{path}{k}"] = int(growth[f"{path}{k}"])
print(json.dumps(growth))
"""


def test_stream_path_peak_memory_does_not_grow_with_k(tmp_path, sentiment):
    import pandas as pd
    from factories import save_ingredient

    # ~13 MB per ingredient; the tokenizer's 21 words fit the 64-id vocabulary.
    config = tiny_bert_config(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                              num_attention_heads=4, max_position_embeddings=64)  # fmt: skip
    dirs = []
    for i in range(6):
        folder = save_ingredient(tmp_path / f"m{i}", config, seed=i + 1)
        sentiment["tok"].save_pretrained(folder)
        dirs.append(str(folder))
    data = {}
    for split, n in (("validation", 64), ("test", 32)):
        data[split] = str(tmp_path / f"{split}.parquet")
        pd.DataFrame(sentiment["splits"][split][:n]).to_parquet(data[split])
    ingredient_kb = (tmp_path / "m0" / "model.safetensors").stat().st_size // 1024
    # Default malloc settings: read buffers are allocated on the consuming thread, so glibc's
    # per-thread arenas do not accumulate them (hfsoup/io/streaming.py).
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    args = [json.dumps(dirs), json.dumps(data), str(tmp_path / "out")]
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    growth = json.loads(proc.stdout.strip().splitlines()[-1])
    # The measurement can see ingredients: holding all six (memory path) shows at least four.
    assert growth["memory6"] - growth["stream6"] > 4 * ingredient_kb, growth
    # Streaming 6 instead of 2 adds less than half of one ingredient.
    assert growth["stream6"] - growth["stream2"] < ingredient_kb // 2, growth
