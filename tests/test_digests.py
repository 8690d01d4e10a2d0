"""Outputs pinned before the redesign (issue 13): every method's soup must stay byte-identical.

The digests were taken from the code as it was before the method registry and the task-kind
protocol; a refactor that changes one byte of a soup's weights, or a key of results.json,
fails here. The ingredients are built deterministically (seeded init + seeded noise), so the
bytes do not depend on the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid

import pytest

import hfsoup


def _digests(folder) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16]
        for p in sorted(folder.iterdir())
        if p.name.endswith((".safetensors", ".safetensors.index.json"))
    }


def _keys(value, depth: int = 2) -> object:
    """The key tree of results.json to ``depth`` (values left out: timings vary)."""
    if isinstance(value, dict) and depth:
        return {k: _keys(v, depth - 1) for k, v in sorted(value.items())}
    return type(value).__name__


@pytest.fixture(scope="module")
def pinned_ingredients(tmp_path_factory, hub):
    """Three tiny BERTs (seeded), the second sharded, with a tokenizer; a 24-row dataset."""
    from factories import save_ingredient, tiny_bert_config
    from greedy_fixtures import publish_dataset, sentences, tokenizer
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url)
    tmp = tmp_path_factory.mktemp("pinned")
    tag = uuid.uuid4().hex[:8]
    dataset = f"test-org/pinned-sentiment-{tag}"
    publish_dataset(api, dataset, {"validation": sentences(24, 1), "test": sentences(24, 2)}, tmp)
    tok = tokenizer(tmp)
    repos = []
    for i in range(3):
        shard = "8KB" if i == 1 else "5GB"
        folder = save_ingredient(tmp / f"ing{i}", tiny_bert_config(), seed=i + 1,
                                 max_shard_size=shard)  # fmt: skip
        tok.save_pretrained(folder)
        repo = f"test-org/pinned-{i}-{tag}"
        api.create_repo(repo)
        api.upload_folder(repo_id=repo, folder_path=str(folder))
        repos.append(repo)
    task = {"dataset": dataset, "selection_split": "validation", "report_splits": ["test"],
            "input_columns": ["text"], "label_column": "label", "metrics": ["accuracy"]}  # fmt: skip
    return {"repos": repos, "task": task}


EXPECTED = {
    "greedy": {
        "files": {"model.safetensors": "54a7677ff62690fb"},
        "results_keys": {
            "greedy": {
                "accept": "str",
                "accepted": "list",
                "examples_full_evaluation": "int",
                "examples_saved": "int",
                "examples_saved_acceptances": "int",
                "examples_saved_rejections": "int",
                "examples_scored": "int",
                "order": "str",
                "trace": "list",
            },
            "greedy_ensemble": {"members": "list"},
            "hardware": {
                "blocks_per_device": "dict",
                "device_map": "NoneType",
                "devices": "list",
                "nodes": "int",
                "processes": "int",
                "score_dtype": "str",
            },
            "hfsoup_version": "str",
            "ingredients": "list",
            "method": "str",
            "name": "NoneType",
            "output": {"parameters": "int", "shards": "int"},
            "selection": {"metric": "str", "split": "str"},
            "table": {
                "best_individual": "dict",
                "ensemble": "dict",
                "greedy_ensemble": "dict",
                "greedy_soup": "dict",
                "uniform_soup": "dict",
            },
            "task": {
                "allow_overlap": "bool",
                "batch_size": "int",
                "config": "NoneType",
                "dataset": "str",
                "holdout": "NoneType",
                "input_columns": "list",
                "label_column": "str",
                "limit": "NoneType",
                "max_length": "int",
                "metrics": "list",
                "report_splits": "list",
                "selection_split": "str",
            },
            "timings": {
                "cache": "dict",  # the outputs cache's {hits, misses} (additive)
                "greedy_soup": "float",
                "load_task": "float",
                "order_examples": "float",  # candidates scored hardest first (additive)
                "resolve": "float",
                "score_ingredients": "float",
                "uniform_soup": "float",
                "write": "float",
            },
        },
    },
    "learned": {
        "files": {"alpha": [0.3616, 0.2783, 0.3601]},  # learned on length-bucketed batches
        "results_keys": {
            "greedy_ensemble": {"members": "list"},
            "hardware": {
                "blocks_per_device": "dict",
                "device_map": "NoneType",
                "devices": "list",
                "nodes": "int",
                "processes": "int",
                "score_dtype": "str",
            },
            "hfsoup_version": "str",
            "ingredients": "list",
            "learned": {
                "alpha": "list",
                "batch_size": "int",
                "beta": "float",
                "by_layer": "bool",
                "epochs": "int",
                "estimate": "dict",
                "groups": "dict",
                "loss": "list",
                "lr": "float",
                "param": "str",
                "path": "str",
                "steps": "int",
            },
            "method": "str",
            "name": "NoneType",
            "output": {"parameters": "int", "shards": "int"},
            "selection": {"metric": "str", "split": "str"},
            "table": {
                "best_individual": "dict",
                "ensemble": "dict",
                "greedy_ensemble": "dict",
                "learned_soup": "dict",
                "uniform_soup": "dict",
            },
            "task": {
                "allow_overlap": "bool",
                "batch_size": "int",
                "config": "NoneType",
                "dataset": "str",
                "holdout": "NoneType",
                "input_columns": "list",
                "label_column": "str",
                "limit": "NoneType",
                "max_length": "int",
                "metrics": "list",
                "report_splits": "list",
                "selection_split": "str",
            },
            "timings": {
                "cache": "dict",  # the outputs cache's {hits, misses} (additive)
                "learn": "float",
                "load_task": "float",
                "resolve": "float",
                "score_ingredients": "float",
                "uniform_soup": "float",
                "write": "float",
            },
        },
    },
    "uniform": {
        "files": {"model.safetensors": "742008581d2679e8"},
        "results_keys": {
            "hardware": {
                "blocks_per_device": "dict",
                "device_map": "NoneType",
                "devices": "list",
                "nodes": "int",
                "processes": "int",
                "score_dtype": "str",
            },
            "hfsoup_version": "str",
            "ingredients": "list",
            "method": "str",
            "name": "NoneType",
            "output": {"parameters": "int", "shards": "int"},
            "timings": {"resolve": "float", "stream": "float"},
        },
    },
    "weighted-bf16-sharded": {
        "files": {
            "model-00001-of-00002.safetensors": "cbaeffb919700b9d",
            "model-00002-of-00002.safetensors": "06a8511be39f5442",
            "model.safetensors.index.json": "773b926a13324083",
        },
        "results_keys": {
            "hardware": {
                "blocks_per_device": "dict",
                "device_map": "NoneType",
                "devices": "list",
                "nodes": "int",
                "processes": "int",
                "score_dtype": "str",
            },
            "hfsoup_version": "str",
            "ingredients": "list",
            "method": "str",
            "name": "NoneType",
            "output": {"parameters": "int", "shards": "int"},
            "timings": {"resolve": "float", "stream": "float"},
        },
    },
}

CASES = {
    "uniform": {},
    "weighted-bf16-sharded": {"weights": [3, 1, 1], "dtype": "bfloat16", "max_shard_size": "8KB"},
    "greedy": {"method": "greedy", "task": "TASK"},
    "learned": {"method": "learned", "task": "TASK",
                "learned": {"epochs": 1, "lr": 0.05, "batch_size": 8, "path": "memory"}},
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_soup_bytes_and_results_keys_are_unchanged_by_the_redesign(
    pinned_ingredients, tmp_path, case
):
    options = {k: (pinned_ingredients["task"] if v == "TASK" else v)
               for k, v in CASES[case].items()}  # fmt: skip
    out = tmp_path / "soup"
    hfsoup.soup(pinned_ingredients["repos"], output=out, progress=False, **options)
    results = json.loads((out / "results.json").read_text())
    got = {"files": _digests(out), "results_keys": _keys(results)}
    if case == "learned":
        # Learned weights come out of Adam steps whose last float bits may depend on the CPU's
        # vector width; the weights to 4 places are pinned instead of the bytes.
        got["files"] = {"alpha": [round(a, 4) for a in results["learned"]["alpha"]]}
    if os.environ.get("HFSOUP_PIN_DIGESTS"):  # how EXPECTED was written
        with open(os.environ["HFSOUP_PIN_DIGESTS"], "a") as f:
            f.write(json.dumps({case: got}, sort_keys=True) + "\n")
    assert got == EXPECTED[case]
