"""A uniform soup from a cold HF cache, against the same soup from a warm one (issue 15).

The script publishes ``--k`` BERT "fine-tunes" (float32 safetensors, one seeded init plus a
seeded perturbation each; ``--layers`` sets the size) to hfsoup's test Hub on 127.0.0.1, then runs
``hfsoup soup`` in a fresh subprocess per case, each on the cache the case names:

* ``cold``: an empty cache; the weights stream over HTTP (range reads), none is kept;
* ``cold --cache``: an empty cache; the weights stream and are written through into it;
* ``warm (after --cache)``: the cache the previous case filled; no weight byte over HTTP;
* ``warm offline``: the same cache with ``HF_HUB_OFFLINE=1``; no request at all;
* ``snapshot_download``: the download alone into an empty cache (the floor of a cold run);
* ``warm (after snapshot_download)``: a soup on the cache that download filled.

Wall time is measured from spawn to exit (interpreter start and imports included). The bytes of
weight files the Hub served during each case are counted on the server (its ``Range`` answers).

Example:
    python benchmarks/bench_cache.py --k 4 --layers 4 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_ingredients(folder: Path, k: int, layers: int) -> list[Path]:
    """``k`` BERT checkpoints of one init plus distinct seeded noise."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(hidden_size=384, num_hidden_layers=layers, num_attention_heads=6,
                        intermediate_size=1536, num_labels=2)  # fmt: skip
    torch.manual_seed(0)
    base = BertForSequenceClassification(config).state_dict()
    out = []
    for i in range(k):
        gen = torch.Generator().manual_seed(i + 1)
        model = BertForSequenceClassification(config)
        model.load_state_dict(
            {n: t + 0.01 * torch.randn(t.shape, generator=gen) if t.is_floating_point() else t
             for n, t in base.items()}
        )  # fmt: skip
        path = folder / f"ing{i}"
        model.save_pretrained(path)
        out.append(path)
    return out


def run_case(args: list[str], env: dict[str, str]) -> float:
    """Seconds a subprocess takes from spawn to exit; it must succeed."""
    t0 = time.perf_counter()
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:4])} failed:\n{proc.stderr[-2000:]}")
    return seconds


def served_bytes(fault, whole: int) -> int:
    """Weight bytes the Hub answered GETs with: the ranges asked, ``whole`` for a GET of a
    whole file (every ingredient is one file of that size)."""
    total = 0
    for r in fault.ranges:
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", r or "")
        total += int(m[2]) - int(m[1]) + 1 if m else whole
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4, help="BERT layers (4: ~76 MB each)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None)
    opts = parser.parse_args()
    work = Path(opts.workdir or tempfile.mkdtemp(prefix="hfsoup-bench-cache-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.update(HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error")

    # The test Hub (tests/faults.py): hfsoup's LocalHub whose rules can record the requests
    # it serves; the product server has no such hook.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from faults import FaultyHub

    hub = FaultyHub(work / "hub", tokens=["hf_bench"], anonymous_writes=True).start()
    os.environ.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HOME=str(work / "home"))
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url)
    dirs = build_ingredients(work / "ingredients", opts.k, opts.layers)
    repos = []
    for i, folder in enumerate(dirs):
        repo = f"bench/cache-ft-{i}"
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(folder))
        repos.append(repo)
    whole = (dirs[0] / "model.safetensors").stat().st_size
    size_mb = sum(f.stat().st_size for d in dirs for f in d.glob("*.safetensors")) / 1e6

    base_env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    base_env.pop("HF_HUB_OFFLINE", None)
    soup = [sys.executable, "-m", "hfsoup", "soup", *repos, "-q", "--overwrite", "--output"]
    download = [sys.executable, "-c", "import sys\nfrom huggingface_hub import snapshot_download\n"
                "for r in sys.argv[1:]: snapshot_download(r)", *repos]  # fmt: skip
    rows: dict[str, list[tuple[float, int]]] = {}

    def case(name: str, cmd: list[str], cache: Path, fresh: bool, **extra: str) -> None:
        if fresh:
            shutil.rmtree(cache, ignore_errors=True)
        recorder = hub.add_fault(method="GET", path=r"/resolve/[^/]+/.*\.safetensors$", times=None)
        env = {**base_env, "HF_HUB_CACHE": str(cache), **extra}
        seconds = run_case(cmd, env)
        hub.faults.remove(recorder)
        rows.setdefault(name, []).append((seconds, served_bytes(recorder, whole)))

    for _ in range(opts.repeats):
        out = str(work / "soup")
        case("cold (streamed, nothing kept)", soup + [out], work / "c1", True)
        case("cold --cache (written through)", soup + [out, "--cache"], work / "c2", True)
        case("warm (after --cache)", soup + [out], work / "c2", False)
        case("warm offline (HF_HUB_OFFLINE=1)", soup + [out], work / "c2", False,
             HF_HUB_OFFLINE="1")  # fmt: skip
        case("snapshot_download alone (cold)", download, work / "c3", True)
        case("warm (after snapshot_download)", soup + [out], work / "c3", False)
    hub.stop()

    print(f"k = {opts.k} ingredients, {size_mb:.0f} MB of weights in all, loopback Hub, "
          f"{opts.repeats} repeat(s), median wall seconds (spawn to exit)\n")  # fmt: skip
    print("| case | wall s | weight MB served by the Hub |\n|---|---:|---:|")
    for name, values in rows.items():
        wall = statistics.median(v[0] for v in values)
        served = statistics.median(v[1] for v in values) / 1e6
        print(f"| {name} | {wall:.2f} | {served:.0f} |")
    (work / "bench_cache.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
