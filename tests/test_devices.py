"""Devices through accelerate: device maps (planned on ``meta``, placed over the CPU), the scoring
dtype, the hardware record, and data-parallel scoring with ``accelerate launch``.

CI has no GPU: GPU planning is checked on ``meta`` with two GPUs declared to accelerate, and
placement and data-parallel scoring run over the CPU (gloo). BENCHMARKS.md covers the GPU.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from unittest import mock

import pytest
import torch
from factories import load_state_dict, tiny_bert_config

import hfsoup
from hfsoup.compute.placement import Placement, infer_device_map, meta_model, parse_max_memory
from hfsoup.errors import InsufficientMemoryError, RecipeError


def test_max_memory_takes_accelerates_syntax():
    assert parse_max_memory(["0=2GiB", "cuda:1=1GB", "cpu=512MiB"]) == {
        0: 2 * 2**30, 1: 10**9, "cpu": 512 * 2**20,
    }  # fmt: skip
    assert parse_max_memory("0=1KB,cpu=2KB") == {0: 1000, "cpu": 2000}
    for bad in (["0"], ["gpu0=1GB"], ["0=lots"]):
        with pytest.raises(RecipeError, match="^max_memory: ") as err:
            parse_max_memory(bad)
        assert err.value.options == ("max_memory",)


def _bert_config(**overrides) -> dict:
    return {
        **tiny_bert_config(**overrides).to_dict(),
        "architectures": ["BertForSequenceClassification"],
    }


def _bytes_per_device(model, device_map):
    """Each device's bytes for the parameters the map puts there, computed from the shapes."""
    placement = Placement(device_map)
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        device = str(placement.device_for(name))
        out[device] = out.get(device, 0) + p.numel() * p.element_size()
    return out


def test_gpu_map_is_planned_on_meta_with_room_for_the_running_sum():
    model = meta_model(_bert_config(num_hidden_layers=4))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    size = sum(p.numel() * 4 for p in model.parameters())
    # Each GPU could hold the float32 model alone, but not the model and its float32 sum.
    budgets = {0: size * 3 // 2, 1: size * 3 // 2, "cpu": 10 * size}
    with mock.patch("torch.cuda.device_count", return_value=2):
        device_map = infer_device_map(model, budgets, strategy="sequential")
    used = _bytes_per_device(model, device_map)
    assert set(used) == {"cuda:0", "cuda:1"}, device_map  # spread over both GPUs
    for gpu, budget in ((0, budgets[0]), (1, budgets[1])):
        assert 2 * used[f"cuda:{gpu}"] <= budget  # model + float32 sum within the budget
    # The first block (embeddings, where batches go) comes first.
    assert next(iter(device_map)).endswith("embeddings")


def test_gpu_map_spills_to_the_cpu_and_refuses_what_does_not_fit():
    model = meta_model(_bert_config(num_hidden_layers=4))
    size = sum(p.numel() * 4 for p in model.parameters())
    with mock.patch("torch.cuda.device_count", return_value=1):
        device_map = infer_device_map(model, {0: size, "cpu": 10 * size}, strategy="sequential")
        assert "cpu" in device_map.values() and "cuda:0" in device_map.values()
        with pytest.raises(InsufficientMemoryError, match="does not fit"):
            infer_device_map(model, {0: size // 10, "cpu": size // 10}, strategy="sequential")


def test_device_auto_spreads_a_model_too_big_for_one_gpu():
    from hfsoup.compute.placement import model_bytes, plan_placement

    config = _bert_config(num_hidden_layers=4)
    need = model_bytes(meta_model(config))  # float32 model + float32 sum
    gpu0 = torch.device("cuda", 0)
    for free, spread in ((need * 3, False), (int(need * 0.8), True)):
        with (
            mock.patch("torch.cuda.device_count", return_value=2),
            mock.patch("torch.cuda.mem_get_info", return_value=(free, free)),
        ):
            placement = plan_placement(config, device=gpu0, all_gpus=True)
        if spread:
            assert placement.strategy == "auto"
            assert {"cuda:0", "cuda:1"} <= set(placement.devices.values()), placement.devices
        else:
            assert placement.devices == {"": "cuda:0"} and placement.strategy is None


def test_cpu_device_map_and_budget(tiny_greedy, cli, tmp_path):
    from hfsoup.compute.placement import plan_placement

    config = _bert_config()
    placement = plan_placement(config, device=torch.device("cpu"), device_map="auto")
    assert placement.devices == {"": "cpu"} and placement.strategy == "auto"
    out = tmp_path / "soup"
    proc = cli("soup", *tiny_greedy["repos"], "--output", str(out), "--device-map", "auto",
               "--max-memory", "cpu=20KB")  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "does not fit" in proc.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--max-memory", "cpu=1GB"],
            "applies only with a device_map; set device_map to auto (--max-memory, --device-map)",
        ),
        (["--device", "cuda:0"], "no CUDA GPU is visible"),
        (["--device", "tpu"], "unknown device"),
        (["--device-map", "auto", "--max-memory", "3=1GB"], "names GPU 3"),
        (["--method", "learned", "--device-map", "auto"], "one process on one device"),
    ],
)
def test_device_options_a_user_gets_wrong(tiny_greedy, cli, tmp_path, flags, message):
    task = tmp_path / "task.yaml"
    task.write_text(json.dumps(tiny_greedy["task"]))  # JSON is YAML
    proc = cli("soup", *tiny_greedy["repos"], "--output", str(tmp_path / "s"), *flags,
               *(["--task", str(task)] if "learned" in flags else []))  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "s").exists()


def test_a_map_of_several_blocks_scores_like_one_device(sentiment):
    """Hooks placed by accelerate over several blocks give the same outputs (all on the CPU)."""
    from hfsoup.api import load_ingredients
    from hfsoup.methods.greedy import SoupSession
    from hfsoup.methods.greedy_run import make_scorer
    from hfsoup.tasks.task import resolve_task

    indexes = load_ingredients(sentiment["repos"][:2])
    scorer = make_scorer(resolve_task(sentiment["task"]), indexes[0], progress=False)
    blocks = Placement({"bert.embeddings": "cpu", "bert.encoder": "cpu", "bert.pooler": "cpu",
                        "dropout": "cpu", "classifier": "cpu"})  # fmt: skip
    mapped, plain = SoupSession(indexes, placement=blocks), SoupSession(indexes)
    assert hasattr(mapped.model.bert.encoder, "_hf_hook")  # accelerate's hooks are in place
    for session in (mapped, plain):
        session.restart(0)
        session.add(1)
        session.show_sum()
    a = scorer.logits(mapped.model, "validation")
    b = scorer.logits(plain.model, "validation")
    assert torch.equal(a, b)


def test_bfloat16_scoring_keeps_a_float32_running_sum(sentiment, tmp_path):
    result = hfsoup.soup(sentiment["repos"], output=tmp_path / "soup", method="greedy",
                         task=sentiment["task"], score_dtype="bfloat16", progress=False)  # fmt: skip
    assert result.results["hardware"]["score_dtype"] == "bfloat16"
    accepted = [sentiment["repos"].index(r) for r in result.results["greedy"]["accepted"]]
    # The soup written is the float32 average of the accepted ingredients, not a bf16 one.
    sds = [load_state_dict(sentiment["dirs"][i]) for i in accepted]
    out = load_state_dict(tmp_path / "soup")
    assert all(t.dtype == torch.float32 for t in out.values())
    worst = max((out[k] - torch.stack([sd[k] for sd in sds]).mean(0)).abs().max() for k in out)
    assert worst <= 1e-6


def test_results_and_card_record_hardware_and_phase_times(tiny_greedy, tmp_path):
    result = hfsoup.soup(tiny_greedy["repos"], output=tmp_path / "soup", progress=False)
    hardware = json.loads((tmp_path / "soup" / "results.json").read_text())["hardware"]
    assert hardware["processes"] == 1 and hardware["nodes"] == 1
    assert [(d["kind"], d["count"]) for d in hardware["devices"]] == [("cpu", 1)]
    assert set(result.results["timings"]) >= {"resolve", "stream"}
    card = (tmp_path / "soup" / "README.md").read_text()
    section = card[card.index("## Hardware and time") :]
    assert "1 process(es) on 1 node(s)" in section
    for phase in ("resolve ingredients", "stream + average + write"):
        assert re.search(rf"\| {re.escape(phase)}[^|]*\| \d+\.\d\d \|", section), section


def test_tensor_read_buffers_are_viewed_not_copied(tiny_greedy):
    """Reads bound for a GPU land in a (pinned) tensor buffer; the tensors are views of it."""
    from hfsoup.api import load_ingredients
    from hfsoup.io.streaming import plan_fetches, read_fetch

    index = load_ingredients(tiny_greedy["dirs"][:1])[0]
    expected = load_state_dict(tiny_greedy["dirs"][0])
    for fetch in plan_fetches(index, index.tensors, slot=0):
        buf = torch.empty(fetch.nbytes, dtype=torch.uint8)
        tensors = read_fetch(fetch, buf)
        for name, t in tensors.items():
            assert torch.equal(t, expected[name])
            assert t.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], processes: int, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``accelerate launch`` with ``processes`` CPU processes (torchrun; gloo), or plain hfsoup."""
    if processes == 1:
        cmd = [sys.executable, "-m", "hfsoup", *args]
    else:
        # `accelerate launch`, run as a module of this interpreter (a venv need not be on PATH).
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "-m", "hfsoup", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _card_without_hardware(folder) -> str:
    card = (folder / "README.md").read_text()
    return card[: card.index("## Hardware and time")]


def test_two_processes_take_the_single_process_decisions(sentiment, tmp_path, api, repo_id):
    task = tmp_path / "task.yaml"
    task.write_text(json.dumps(sentiment["task"]))  # JSON is YAML
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    runs = {}
    for n in (1, 2):
        out, push = tmp_path / f"run{n}" / "soup", repo_id(f"dp{n}")
        proc = _launch(["soup", *sentiment["repos"], "--method", "greedy", "--task", str(task),
                        "--output", str(out), "--push-to", push, "-q", "--json"], n, env)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[n] = (out, push, json.loads((out / "results.json").read_text()), proc.stdout)
    (one, _, single, _), (two, pushed, double, stdout) = runs[1], runs[2]
    assert double["hardware"]["processes"] == 2 and single["hardware"]["processes"] == 1
    # Same decisions, scores, early-rejection counts and table.
    for key in ("greedy", "table", "greedy_ensemble", "selection"):
        assert double[key] == single[key], key
    assert [r["scores"] for r in double["ingredients"]] == [
        r["scores"] for r in single["ingredients"]
    ]
    assert len(single["greedy"]["accepted"]) < len(sentiment["repos"])  # a real decision was made
    # The same soup, bit for bit, and the same card but for the hardware and time section.
    a, b = load_state_dict(one), load_state_dict(two)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _card_without_hardware(one).replace(runs[1][1], "REPO") == _card_without_hardware(
        two
    ).replace(pushed, "REPO")
    # Only the main process wrote, printed and pushed: one output, one report, one commit.
    assert [p.name for p in (tmp_path / "run2").iterdir()] == ["soup"]
    assert stdout.count('"hardware"') == 1
    commits = [c.title for c in api.list_repo_commits(pushed)]
    assert commits.count("Upload model soup made with hfsoup") == 1


def test_two_process_evaluate_reports_what_one_process_does(sentiment, tmp_path):
    task = tmp_path / "task.yaml"
    task.write_text(json.dumps(sentiment["task"]))  # JSON is YAML
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    reports = {}
    for n in (1, 2):
        proc = _launch(["evaluate", *sentiment["repos"][:3], "--task", str(task), "--json", "-q"],
                       n, env)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports[n] = json.loads(proc.stdout)  # one JSON document: only the main process printed
    one, two = reports[1], reports[2]
    assert two["hardware"]["processes"] == 2
    for key in ("table", "greedy_ensemble", "selection"):
        assert two[key] == one[key], key
    assert [r["scores"] for r in two["ingredients"]] == [r["scores"] for r in one["ingredients"]]


def test_other_processes_resume_from_what_the_main_process_saved(tmp_path):
    """Ranks > 0 keep no files: they get the main process's saved decisions and logits."""
    from collections import deque

    from hfsoup.compute.distributed import Processes
    from hfsoup.methods.greedy import _State

    main = _State(tmp_path, "fp", Processes())
    main.data["individual"]["0"] = {"validation": {"accuracy": 0.5}}
    main.data["trace"].append({"index": 0, "accepted": True})
    logits = {"validation": torch.randn(4, 2)}
    main.save_logits(0, logits)
    main.save()

    class Rank1(Processes):
        """Rank 1 of 2, receiving in turn what rank 0 broadcasts."""

        def __init__(self, sent):
            super().__init__(rank=1, world=2)
            self.sent = deque(sent)

        def broadcast(self, obj):
            assert not obj  # rank 1 has nothing of its own to send
            return self.sent.popleft()

    saved = _State(tmp_path, "fp", Processes())  # what rank 0 reads back on resuming
    other = _State(None, "fp", Rank1([saved.data, saved.load_logits(0)]))
    assert other.resumed and other.data == main.data
    assert torch.equal(other.load_logits(0)["validation"], logits["validation"])
    before = sorted(p.name for p in tmp_path.rglob("*"))
    other.save()
    other.save_logits(1, logits)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # it wrote nothing


def test_reads_for_a_gpu_stay_alive_until_their_copies_are_done(tiny_greedy, monkeypatch):
    """The GPU read path, with CUDA's events stood in for: every fetch's tensors are held with
    one event per GPU, at most two fetches stay in flight, and all are waited for at the end."""
    from hfsoup.api import load_ingredients
    from hfsoup.io import streaming

    log: list[tuple] = []

    class Event:
        def record(self, stream):
            log.append(("record", stream))

        def synchronize(self):
            log.append(("sync",))

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: f"stream {device}")
    # Pinned memory needs CUDA; a plain uint8 tensor takes the same (viewing) path.
    monkeypatch.setattr(
        streaming, "read_buffer", lambda n, pin=False: torch.empty(n, dtype=torch.uint8)
    )
    index = load_ingredients(tiny_greedy["dirs"][:1])[0]
    expected = load_state_dict(tiny_greedy["dirs"][0])
    gpus = [torch.device("cuda", 0), torch.device("cuda", 1)]
    fetches = streaming.plan_fetches(index, index.tensors, slot=0, max_chunk=1)  # one each
    assert len(fetches) >= 4  # enough fetches for the depth limit to act
    for seen, (_, tensors) in enumerate(streaming.prefetch(fetches, gpus=gpus)):
        for name, t in tensors.items():
            assert torch.equal(t, expected[name])
        # Before this fetch's event is recorded, at most two earlier fetches are unsynchronised.
        records = sum(1 for e in log if e[0] == "record") // len(gpus)
        syncs = sum(1 for e in log if e[0] == "sync") // len(gpus)
        assert records == seen and records - syncs <= 2
    assert [e for e in log if e[0] == "record"][:2] == [("record", "stream cuda:0"),
                                                       ("record", "stream cuda:1")]  # fmt: skip
    assert log.count(("sync",)) == len(gpus) * len(fetches)  # every copy was waited for
