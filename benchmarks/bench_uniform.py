"""Uniform soup from a loopback Hub: hfsoup vs download-then-average vs mergekit, side by side.

The script builds ``max(k)`` BERT "fine-tunes" of about ``--size-mb`` MB each (float32
safetensors: one seeded init plus a distinct seeded perturbation per ingredient; ingredient 1 is
sharded differently from the others), uploads them with the real ``huggingface_hub`` client to
hfsoup's test Hub (``python -m hfsoup.serve.hubserver``) running in a separate process on 127.0.0.1,
then runs every method in a fresh subprocess with a fresh ``HF_HOME``:

* ``download``: ``snapshot_download`` of every ingredient, nothing else (the floor);
* ``hfsoup``: ``hfsoup.soup(repo_ids, output=..., progress=False)``;
* ``torch``: ``snapshot_download`` of every ingredient, then ``safetensors.torch.load_file`` of
  all of them, sum / k, ``save_file`` (the plain baseline);
* ``mergekit``: mergekit's ``linear`` merge (``run_merge``) of the same repo IDs, read from the
  Hub by mergekit itself (so its time includes its own download).

Each output is checked against an independent float64 average of the local ingredient files
(max abs difference). Wall time is measured by the parent from spawn to exit (interpreter start
and imports included); core time is measured inside the worker after its imports. Peak RSS is
the worker's ``VmHWM``.

Example:
    python benchmarks/bench_uniform.py --install-mergekit --k 4 8 --size-mb 100 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

METHODS = ("import", "download", "hfsoup", "torch", "mergekit")
LABELS = {
    "import": "bare import (torch, huggingface_hub, safetensors)",
    "download": "download only (floor)",
    "hfsoup": "hfsoup uniform soup",
    "torch": "snapshot_download + torch average",
    "mergekit": "mergekit linear (reads the Hub itself)",
}
MERGEKIT_SPEC = "mergekit==0.1.5"
SUMMARY_KEYS = (
    "wall_s", "core_s", "cpu_s", "server_cpu_s", "others_cpu_s", "peak_rss_mb",
    "rss_after_imports_mb",
)  # fmt: skip
NAMESPACE = "bench"
LAYOUT_VERSION = 1  # bump when the ingredients' recipe changes, to rebuild cached ingredients


# ---------------------------------------------------------------------------------------------
# Small helpers shared by the parent and the workers
# ---------------------------------------------------------------------------------------------
def proc_status_kb(field_name: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmHWM`` = peak RSS, ``VmRSS`` = current)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def safetensors_files(folder: Path) -> list[Path]:
    """The ``*.safetensors`` files of a checkpoint folder, sorted."""
    return sorted(Path(folder).glob("*.safetensors"))


def cpu_busy_s() -> float:
    """CPU seconds every process on the machine has used since boot (``/proc/stat``)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = map(int, f.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def wait_for_idle(max_wait: float, threshold: float = 0.2) -> float:
    """Wait (at most ``max_wait`` s) until other processes use < ``threshold`` of the CPUs.

    The machine may be shared; starting a run while someone else's job hogs a core only adds
    noise. Returns the busy fraction seen last.
    """
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = cpu_busy_s(), time.monotonic()
        time.sleep(1.0)
        busy = (cpu_busy_s() - b0) / (time.monotonic() - t0) / (os.cpu_count() or 1)
        if busy < threshold or time.monotonic() > deadline:
            return busy


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hub_env(endpoint: str, hf_home: Path | None = None, src: Path | None = None) -> dict[str, str]:
    """The environment a Hub client needs to talk to the loopback server (and nothing else).

    ``src``: a folder holding a pinned copy of ``hfsoup/``, put first on ``PYTHONPATH``.
    """
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
    for key in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        env.pop(key, None)
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_IMPLICIT_TOKEN="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    if hf_home is not None:
        env["HF_HOME"] = str(hf_home)
    return env


# ---------------------------------------------------------------------------------------------
# Worker side: one method, in its own process
# ---------------------------------------------------------------------------------------------
def download_all(repos: Sequence[str]) -> list[Path]:
    """``snapshot_download`` every repo into the (fresh) HF cache, repos concurrently."""
    from huggingface_hub import snapshot_download

    with ThreadPoolExecutor(max_workers=len(repos)) as pool:
        return [Path(p) for p in pool.map(lambda r: snapshot_download(r), repos)]


def run_import(repos: Sequence[str], out: Path) -> dict[str, float]:
    """Nothing: the worker's own imports (torch, huggingface_hub, safetensors) are the figure."""
    return {}


def run_download(repos: Sequence[str], out: Path) -> dict[str, float]:
    """The floor: fetch every byte of every ingredient and do nothing with it."""
    download_all(repos)
    return {}


def run_hfsoup(repos: Sequence[str], out: Path) -> dict[str, float]:
    """hfsoup's uniform soup, streamed from the Hub."""
    import hfsoup

    options = {}
    if os.environ.get("BENCH_MAX_IN_FLIGHT"):  # --max-in-flight, to compare read-ahead sizes
        from hfsoup.units import parse_size

        options["max_in_flight"] = parse_size(os.environ["BENCH_MAX_IN_FLIGHT"])
    result = hfsoup.soup(list(repos), output=out, progress=False, **options)
    return {k: round(v, 3) for k, v in result.timings.items()}


def run_torch(repos: Sequence[str], out: Path) -> dict[str, float]:
    """The plain baseline: download everything, load everything, sum / k, save."""
    import torch
    from safetensors.torch import load_file, save_file

    t0 = time.perf_counter()
    folders = download_all(repos)
    t1 = time.perf_counter()
    states: list[dict[str, torch.Tensor]] = []
    for folder in folders:
        state: dict[str, torch.Tensor] = {}
        for f in safetensors_files(folder):
            state.update(load_file(f))
        states.append(state)
    k = len(states)
    avg = {}
    for name, first in states[0].items():
        if first.is_floating_point():
            avg[name] = (sum(s[name].float() for s in states) / k).to(first.dtype).contiguous()
        else:
            avg[name] = first
    out.mkdir(parents=True, exist_ok=True)
    save_file(avg, out / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(folders[0] / "config.json", out / "config.json")
    t2 = time.perf_counter()
    return {"download": round(t1 - t0, 3), "average+save": round(t2 - t1, 3)}


def run_mergekit(repos: Sequence[str], out: Path) -> dict[str, float]:
    """mergekit's ``linear`` merge of the repo IDs (mergekit downloads them itself)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(
        {
            "merge_method": "linear",
            "models": [{"model": r, "parameters": {"weight": 1.0}} for r in repos],
            "parameters": {"normalize": True},
            "dtype": "float32",
        }
    )
    options = MergeOptions(copy_tokenizer=False, lazy_unpickle=True, quiet=True)
    options.apply_global_options()
    run_merge(config, str(out), options=options)
    return {}


RUNNERS: dict[str, Callable[[Sequence[str], Path], dict[str, float]]] = {
    "import": run_import,
    "download": run_download,
    "hfsoup": run_hfsoup,
    "torch": run_torch,
    "mergekit": run_mergekit,
}
# Imported before the core timer starts, so that core time is the work alone.
PRELOAD = {
    "import": [],
    "download": [],
    "hfsoup": ["hfsoup", "hfsoup.api"],
    "torch": [],
    "mergekit": ["mergekit.config", "mergekit.merge", "mergekit.options"],
}


def worker_main(method: str, repos: Sequence[str], out: Path, result: Path) -> None:
    """Run one method once and write ``{core_s, peak_rss_kb, ...}`` to ``result``."""
    import importlib

    import huggingface_hub  # noqa: F401  (imports excluded from core time)
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    for module in PRELOAD[method]:
        importlib.import_module(module)
    rss_imports = proc_status_kb("VmRSS")
    t0 = time.perf_counter()
    phases = RUNNERS[method](repos, out)
    core = time.perf_counter() - t0
    data = {
        "core_s": core,
        "peak_rss_kb": proc_status_kb("VmHWM"),
        "rss_after_imports_kb": rss_imports,
        "phases": phases,
    }
    result.write_text(json.dumps(data))


# ---------------------------------------------------------------------------------------------
# Parent side: ingredients, server, runs, verification, table
# ---------------------------------------------------------------------------------------------
@dataclass
class Ingredients:
    """The benchmark's ingredients: Hub repo IDs and the local folders they were uploaded from."""

    repos: list[str]
    folders: list[Path]
    num_parameters: int
    nbytes: int


@dataclass
class Run:
    """One measured run of one method."""

    method: str
    k: int
    repeat: int
    wall_s: float | None = None
    core_s: float | None = None
    peak_rss_mb: float | None = None
    rss_after_imports_mb: float | None = None
    cpu_s: float | None = None
    server_cpu_s: float | None = None
    loadavg: float | None = None
    busy_before: float | None = None
    others_cpu_s: float | None = None
    max_abs_diff: float | None = None
    tensors_checked: int = 0
    missing: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def bert_config(size_mb: float):
    """A ``BertConfig`` (sequence classification, 2 labels) of about ``size_mb`` MB in float32."""
    from transformers import BertConfig

    hidden, vocab, positions = (512, 8192, 512) if size_mb >= 40 else (128, 8192, 512)
    inter = 4 * hidden
    target = size_mb * 1e6 / 4
    embeddings = (vocab + positions + 2) * hidden + 2 * hidden
    per_layer = 4 * hidden * hidden + 2 * hidden * inter + 9 * hidden + inter
    head = hidden * hidden + hidden + 2 * hidden + 2
    layers = max(1, round((target - embeddings - head) / per_layer))
    return BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        intermediate_size=inter,
        max_position_embeddings=positions,
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
        architectures=["BertForSequenceClassification"],
    )


def big_embedding_config():
    """A "7B-shaped" ``BertConfig``: one layer of 1024, a 256,000-token vocabulary, so that the
    word embedding alone is 262M parameters (524 MB in bfloat16), like a 7B model's."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=256_000, hidden_size=1024, num_hidden_layers=1, num_attention_heads=8,
        intermediate_size=1024, max_position_embeddings=512,
        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1},
        architectures=["BertForSequenceClassification"],
    )  # fmt: skip


def build_ingredients(
    folder: Path, k: int, size_mb: float, seed: int, shape: str = "bert"
) -> list[Path]:
    """Save ``k`` fine-tunes: the init of ``seed`` plus seeded noise; #1 is sharded in thirds.

    ``shape`` "7b": :func:`big_embedding_config`, saved in bfloat16 (``size_mb`` unused).
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    config = bert_config(size_mb) if shape == "bert" else big_embedding_config()
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    if shape == "7b":
        model = model.to(torch.bfloat16)
        size_mb = sum(p.numel() * 2 for p in model.parameters()) / 1e6
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    folders = []
    for i in range(k):
        gen = torch.Generator().manual_seed(seed + 1 + i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(base[n] + 0.01 * torch.randn(p.shape, generator=gen).to(p.dtype))
        path = folder / f"ft-{i}"
        shard = f"{max(1, int(size_mb // 3))}MB" if i == 1 else "5GB"
        model.save_pretrained(path, max_shard_size=shard)
        folders.append(path)
    return folders


def _wanted(args: argparse.Namespace) -> dict[str, Any]:
    tag = f"bert{args.size_mb:g}mb-s{args.seed}" if args.shape == "bert" else f"7b-s{args.seed}"
    return {"version": LAYOUT_VERSION, "tag": tag, "k": max(args.k)}


def cached_ingredients(args: argparse.Namespace) -> Ingredients | None:
    """The ingredients a previous run left in ``workdir`` (Hub data included), if they fit."""
    manifest_path = args.workdir / "ingredients" / "manifest.json"
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    want = _wanted(args)
    if {key: manifest.get(key) for key in want} != want:
        return None
    folders = [Path(p) for p in manifest["folders"]]
    return Ingredients(manifest["repos"], folders, manifest["params"], manifest["bytes"])


def prepare(args: argparse.Namespace, endpoint: str, token: str) -> Ingredients:
    """Build the ingredients and upload them with the real client (a fresh Hub folder)."""
    want = _wanted(args)
    kmax, tag = want["k"], want["tag"]
    manifest_path = args.workdir / "ingredients" / "manifest.json"
    os.environ.update(hub_env(endpoint))
    from huggingface_hub import HfApi

    shutil.rmtree(manifest_path.parent, ignore_errors=True)
    t0 = time.perf_counter()
    folders = build_ingredients(manifest_path.parent, kmax, args.size_mb, args.seed, args.shape)
    t1 = time.perf_counter()
    api = HfApi(endpoint=endpoint, token=token)
    repos = []
    for i, path in enumerate(folders):
        repo = f"{NAMESPACE}/{tag}-ft{i}"
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(path), commit_message="ingredient")
        repos.append(repo)
    t2 = time.perf_counter()
    params, nbytes = _count(folders[0])
    print(
        f"built {kmax} ingredients of {params / 1e6:.1f}M params ({nbytes / 1e6:.1f} MB) in "
        f"{t1 - t0:.1f}s, uploaded in {t2 - t1:.1f}s",
        flush=True,
    )
    manifest = {
        **want,
        "repos": repos,
        "folders": [str(p) for p in folders],
        "params": params,
        "bytes": nbytes,
    }
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return Ingredients(repos, folders, params, nbytes)


def _count(folder: Path) -> tuple[int, int]:
    """Parameters and safetensors bytes of one checkpoint folder."""
    import math

    from safetensors import safe_open

    params = 0
    for f in safetensors_files(folder):
        with safe_open(f, "pt") as st:
            params += sum(math.prod(st.get_slice(n).get_shape()) for n in st.keys())  # noqa: SIM118
    return params, sum(f.stat().st_size for f in safetensors_files(folder))


def load_state(folder: Path) -> dict[str, Any]:
    """Every tensor of a (possibly sharded) safetensors checkpoint."""
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for f in safetensors_files(folder):
        state.update(load_file(f))
    return state


def reference_average(folders: Sequence[Path]) -> dict[str, Any]:
    """An independent uniform average of the local ingredient files, accumulated in float64."""
    ref: dict[str, Any] = {}
    for folder in folders:
        for name, t in load_state(folder).items():
            if not t.is_floating_point():
                ref.setdefault(name, t)
            elif name in ref:
                ref[name] += t.double()
            else:
                ref[name] = t.double()
    for t in ref.values():
        if t.is_floating_point():
            t /= len(folders)
    return ref


def compare(out: Path, ref: dict[str, Any], run: Run) -> None:
    """Fill ``run.max_abs_diff`` (float32 output vs float64 reference) and missing tensors."""
    import torch

    got = load_state(out)
    diff = 0.0
    for name, expected in ref.items():
        if name not in got:
            run.missing.append(name)
            continue
        t = got[name]
        if tuple(t.shape) != tuple(expected.shape):
            run.error = f"{name}: shape {tuple(t.shape)} != {tuple(expected.shape)}"
            return
        if expected.is_floating_point():
            d = (t.to(torch.float32).double() - expected.to(torch.float32).double()).abs().max()
            diff = max(diff, float(d))
        elif not torch.equal(t, expected):
            diff = float("inf")
        run.tensors_checked += 1
    run.max_abs_diff = diff


class HubServer:
    """``python -m hfsoup.serve.hubserver`` in its own process (its own GIL), on a free port."""

    def __init__(self, data: Path, log: Path, src: Path | None = None) -> None:
        self.data, self.log, self.port, self.src = data, log, free_port(), src
        self.token = secrets.token_urlsafe(24)  # writes (the uploads of `prepare`) need one
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> HubServer:
        self.data.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "hfsoup.serve.hubserver", "--data", str(self.data)]
        cmd += ["--token", self.token]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [*cmd, "--port", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=hub_env(self.url, src=self.src),
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hub server exited; see {self.log}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.__exit__()
        raise RuntimeError(f"hub server did not start; see {self.log}")

    def cpu_s(self) -> float:
        """CPU seconds (user + system, all threads) the server has used so far."""
        import psutil

        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class CpuHogs:
    """``n`` busy-looping processes, to measure the methods on a machine whose CPUs are shared."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> CpuHogs:
        cmd = [sys.executable, "-c", "while True: pass"]
        self.procs = [subprocess.Popen(cmd) for _ in range(self.n)]
        return self

    def cpu_s(self) -> float:
        """CPU seconds the hogs have used so far."""
        import psutil

        return sum(sum(psutil.Process(p.pid).cpu_times()[:2]) for p in self.procs)

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


def mergekit_python(args: argparse.Namespace) -> str | None:
    """An interpreter that can import mergekit (this one, or ``WORKDIR/mkvenv``), or ``None``."""
    venv_python = args.workdir / "mkvenv" / "bin" / "python"
    if args.install_mergekit and not venv_python.exists():
        install_mergekit(args.workdir / "mkvenv")
    for python in (sys.executable, str(venv_python)):
        if Path(python).exists() and _can_import(python, "mergekit"):
            return python
    return None


def install_mergekit(venv: Path) -> None:
    """``pip install mergekit==0.1.5`` into a venv that sees this interpreter's packages.

    A separate venv (``--system-site-packages``) leaves the project's environment untouched;
    the install is refused if it would replace the preinstalled torch.
    """
    import torch

    print(f"installing {MERGEKIT_SPEC} into {venv}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    dry = subprocess.run(
        [*pip, "--dry-run", MERGEKIT_SPEC], capture_output=True, text=True, check=True
    )
    if "torch-" in dry.stdout.split("Would install")[-1]:
        raise RuntimeError(f"{MERGEKIT_SPEC} wants to replace torch {torch.__version__}")
    subprocess.run([*pip, MERGEKIT_SPEC], check=True)


def _can_import(python: str, module: str) -> bool:
    probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True)
    return probe.returncode == 0


CHILDREN, SELF = resource.RUSAGE_CHILDREN, resource.RUSAGE_SELF


def _cpu(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


def run_once(
    method: str,
    k: int,
    repeat: int,
    ingredients: Ingredients,
    server: HubServer,
    args: argparse.Namespace,
    python: str,
    ref: dict[str, Any],
    hogs: CpuHogs,
) -> Run:
    """Spawn one worker with a fresh HF_HOME, time it, verify its output, clean up."""
    run = Run(method, k, repeat)
    base = args.workdir / "runs" / f"{method}-k{k}-r{repeat}"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    out, result = base / "out", base / "result.json"
    cmd = [python, str(Path(__file__).resolve()), "--worker", method, "--out", str(out)]
    cmd += ["--result", str(result), "--repos", *ingredients.repos[:k]]
    env = hub_env(server.url, base / "hf_home", src=args.src)
    env.update(dict(item.split("=", 1) for item in args.env))
    os.sync()  # do not let the previous run's writeback land in this one
    if args.wait_idle > 0 and not hogs.n:
        run.busy_before = wait_for_idle(args.wait_idle)
    run.loadavg = os.getloadavg()[0]
    children0, me0 = resource.getrusage(CHILDREN), resource.getrusage(SELF)
    server0, busy0, hogs0 = server.cpu_s(), cpu_busy_s(), hogs.cpu_s()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    run.wall_s = time.perf_counter() - t0
    busy1, server1, hogs1 = cpu_busy_s(), server.cpu_s(), hogs.cpu_s()
    children1, me1 = resource.getrusage(CHILDREN), resource.getrusage(SELF)
    run.cpu_s = _cpu(children1) - _cpu(children0)
    run.server_cpu_s = server1 - server0
    mine = run.cpu_s + run.server_cpu_s + _cpu(me1) - _cpu(me0) + hogs1 - hogs0
    run.others_cpu_s = max(0.0, busy1 - busy0 - mine)
    if proc.returncode != 0 or not result.is_file():
        lines = (proc.stderr or proc.stdout).strip().splitlines() or [f"rc={proc.returncode}"]
        run.error = lines[-1][:200]
        (base / "stderr.txt").write_text(proc.stderr)
        return run
    data = json.loads(result.read_text())
    run.core_s = data["core_s"]
    run.peak_rss_mb = data["peak_rss_kb"] / 1024
    run.rss_after_imports_mb = data["rss_after_imports_kb"] / 1024
    run.phases = data["phases"]
    if method not in ("download", "import"):
        compare(out, ref, run)
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return run


def warm_up(python: str, methods: Sequence[str]) -> None:
    """Import everything once, so the first measured run does not pay for cold files."""
    modules = ["torch", "huggingface_hub", "safetensors.torch", "transformers"]
    for m in methods:
        modules += PRELOAD[m]
    subprocess.run([python, "-c", "import " + ", ".join(modules)], check=False)


def export_hfsoup(rev: str, workdir: Path) -> Path:
    """``git archive REV hfsoup`` into ``WORKDIR/src/SHA`` (a copy no concurrent edit touches)."""
    root = Path(__file__).resolve().parent.parent
    sha = subprocess.run(
        ["git", "rev-parse", "--verify", f"{rev}^{{commit}}"],
        cwd=root, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    dest = workdir / "src" / sha
    if not (dest / "hfsoup" / "__init__.py").is_file():
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "archive", sha, "hfsoup"], cwd=root, capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def measured_code(src: Path | None = None, rev: str | None = None) -> str:
    """Which hfsoup was measured: version, commit, and whether ``hfsoup/`` had local edits."""
    if src is not None:
        return f"hfsoup as committed at {src.name[:7]} (--hfsoup-rev {rev})"
    import hfsoup

    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "hfsoup"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        sha, dirty = "", ""
    where = f" at commit {sha}" + (" + uncommitted edits in hfsoup/" if dirty else "")
    return f"hfsoup {getattr(hfsoup, '__version__', '?')}{where if sha else ''}"


def median(values: Sequence[float | None]) -> float | None:
    """Median of the values that are not ``None``."""
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def paired_ratio(runs: Sequence[Run], refs: Sequence[Run], key: str) -> float | None:
    """Median over repeats of ``runs[key] / refs[key]`` within the same repeat.

    Pairing by repeat cancels slow drifts of a shared machine better than a ratio of medians.
    """
    ref_by_repeat = {r.repeat: getattr(r, key) for r in refs if r.error is None}
    ratios = [
        getattr(r, key) / ref_by_repeat[r.repeat]
        for r in runs
        if r.error is None and getattr(r, key) and ref_by_repeat.get(r.repeat)
    ]
    return statistics.median(ratios) if ratios else None


def summarise(runs: Sequence[Run], methods: Sequence[str], ks: Sequence[int]) -> list[dict]:
    """One row per (k, method): medians over repeats, and paired ratios to hfsoup."""
    rows = []
    for k in ks:
        group = {m: [r for r in runs if r.method == m and r.k == k] for m in methods}
        med = {
            m: {key: median([getattr(r, key) for r in rs]) for key in SUMMARY_KEYS}
            for m, rs in group.items()
        }
        for m in methods:
            rs = group[m]
            ok = [r for r in rs if r.error is None]
            diffs = [r.max_abs_diff for r in ok if r.max_abs_diff is not None]
            row = {"method": m, "k": k, **med[m], "runs": len(rs), "ok": len(ok)}
            row["core_s_min"] = min((r.core_s for r in ok), default=None)
            row["max_abs_diff"] = max(diffs) if diffs else None
            row["missing"] = sorted({n for r in ok for n in r.missing})
            row["errors"] = sorted({r.error for r in rs if r.error})
            row["phases"] = {
                key: median([r.phases.get(key) for r in ok]) for key in ok[0].phases
            } if ok else {}  # fmt: skip
            for key in ("wall_s", "core_s"):
                row[f"{key}_ratio"] = paired_ratio(rs, group.get("hfsoup", []), key)
            bare = med.get("import", {}).get("peak_rss_mb")
            peak = med[m]["peak_rss_mb"]
            row["above_import_mb"] = None if bare is None or peak is None else peak - bare
            rows.append(row)
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def table(rows: Sequence[dict], nbytes: int) -> str:
    """The results as a Markdown table."""
    head = (
        "| method | k | wall s | core s | core s (min) | CPU s | peak RSS MB "
        "| RSS after imports MB | max\\|diff\\| | wall × hfsoup | core × hfsoup | notes |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        notes = []
        if r["method"] == "download" and r["core_s"]:
            notes.append(f"{r['k'] * nbytes / 1e6 / r['core_s']:.0f} MB/s")
        notes += [f"{key} {val:.2f}s" for key, val in r["phases"].items() if val is not None]
        if r.get("above_import_mb") is not None and r["method"] != "import":
            notes.append(f"peak {r['above_import_mb']:.0f} MB above bare import")
        if r["server_cpu_s"] is not None:
            notes.append(f"server CPU {r['server_cpu_s']:.1f}s")
        if r["others_cpu_s"] is not None:
            notes.append(f"other processes' CPU {r['others_cpu_s']:.1f}s")
        if r["missing"]:
            notes.append(f"{len(r['missing'])} tensors missing: {', '.join(r['missing'][:3])}")
        if r["errors"]:
            notes.append("FAILED: " + "; ".join(r["errors"]))
        if r["runs"] > 1:
            notes.append(f"median of {r['ok']}/{r['runs']}")
        diff = "n/a" if r["method"] in ("download", "import") else _fmt(r["max_abs_diff"], ".1e")
        lines.append(
            f"| {LABELS[r['method']]} | {r['k']} | {_fmt(r['wall_s'], '.2f')} "
            f"| {_fmt(r['core_s'], '.2f')} | {_fmt(r['core_s_min'], '.2f')} "
            f"| {_fmt(r['cpu_s'], '.1f')} | {_fmt(r['peak_rss_mb'], '.0f')} "
            f"| {_fmt(r['rss_after_imports_mb'], '.0f')} | {diff} "
            f"| {_fmt(r['wall_s_ratio'], '.2f')} | {_fmt(r['core_s_ratio'], '.2f')} "
            f"| {'; '.join(notes)} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--worker`` and friends are internal)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, nargs="+", default=[4, 8], help="ingredient counts")
    p.add_argument("--size-mb", type=float, default=100, help="size of one ingredient, MB")
    p.add_argument("--repeats", type=int, default=1, help="runs per (method, k); median shown")
    p.add_argument("--workdir", type=Path, default=Path(".bench"), help="scratch folder")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seed", type=int, default=0, help="seed of the shared init")
    p.add_argument("--shape", choices=["bert", "7b"], default="bert",
                   help="7b: ingredients with a 524 MB bfloat16 embedding (--size-mb unused)")  # fmt: skip
    p.add_argument(
        "--install-mergekit",
        action="store_true",
        help=f"pip install {MERGEKIT_SPEC} into WORKDIR/mkvenv if mergekit is not importable",
    )
    p.add_argument(
        "--hfsoup-rev",
        help="measure hfsoup as committed at this git revision (exported to WORKDIR/src), not "
        "the working tree; the Hub server runs from the same copy",
    )
    p.add_argument(
        "--wait-idle",
        type=float,
        default=60,
        metavar="SECONDS",
        help="before each run, wait up to this long for other processes to go quiet (0: off)",
    )
    p.add_argument(
        "--cpu-hogs",
        type=int,
        default=0,
        metavar="N",
        help="run N busy-looping processes throughout, to measure on a shared machine",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for every worker (e.g. OMP_WAIT_POLICY=PASSIVE); repeatable",
    )
    p.add_argument("--keep", action="store_true", help="keep each run's outputs and cache")
    p.add_argument("--json", type=Path, help="also write every run and the summary here")
    p.add_argument(
        "--max-others-cpu",
        type=float,
        metavar="SECONDS",
        help="also print a table of only the runs during which other processes on the machine "
        "used at most this many CPU-seconds",
    )
    p.add_argument("--from-json", type=Path, help="only re-print the tables of a --json file")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--repos", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or, with ``--worker``, one method inside a worker process)."""
    args = parse_args(argv)
    # A clean exit on SIGTERM too, so that the Hub server and the current worker are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.worker:
        worker_main(args.worker, args.repos, args.out, args.result)
        return 0
    if args.from_json:
        return report_from_json(args.from_json, args.max_others_cpu)
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.src = export_hfsoup(args.hfsoup_rev, args.workdir) if args.hfsoup_rev else None
    ks = sorted(set(args.k))
    methods = list(args.methods)
    pythons = {m: sys.executable for m in methods}
    if "mergekit" in methods:
        python = mergekit_python(args)
        if python is None:
            print("mergekit is not importable (try --install-mergekit): skipping it", flush=True)
            methods.remove("mergekit")
        else:
            pythons["mergekit"] = python

    runs: list[Run] = []
    ingredients = cached_ingredients(args)
    if ingredients is None:
        shutil.rmtree(args.workdir / "hub", ignore_errors=True)
    else:
        print(f"reusing the ingredients in {args.workdir / 'ingredients'}", flush=True)
    log = args.workdir / "hubserver.log"
    with HubServer(args.workdir / "hub", log, src=args.src) as server:
        print(f"hub server pid {server.proc.pid} at {server.url}", flush=True)
        ingredients = ingredients or prepare(args, server.url, server.token)
        for python in set(pythons.values()):
            warm_up(python, [m for m in methods if pythons[m] == python])
        refs = {k: reference_average(ingredients.folders[:k]) for k in ks}
        with CpuHogs(args.cpu_hogs) as hogs:
            runs += run_all(args, methods, ks, ingredients, server, pythons, refs, hogs)

    meta = {
        "ingredients": len(ingredients.repos),
        "params": ingredients.num_parameters,
        "nbytes": ingredients.nbytes,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "code": measured_code(args.src, args.hfsoup_rev),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "cpu_hogs": args.cpu_hogs,
        "shape": args.shape,
        "worker_env": list(args.env),
    }
    rows = report(runs, methods, ks, meta, args.max_others_cpu)
    if args.json:
        data = {"meta": meta, "runs": [asdict(r) for r in runs], "summary": rows}
        args.json.write_text(json.dumps(data, indent=1))
    return 0 if all(r.error is None for r in runs) else 1


def run_all(
    args: argparse.Namespace,
    methods: Sequence[str],
    ks: Sequence[int],
    ingredients: Ingredients,
    server: HubServer,
    pythons: dict[str, str],
    refs: dict[int, dict[str, Any]],
    hogs: CpuHogs,
) -> list[Run]:
    """Every (repeat, k, method) once, interleaved so that drifts hit all methods alike."""
    runs = []
    for repeat in range(args.repeats):
        for k in ks:
            for method in methods:
                run = run_once(
                    method, k, repeat, ingredients, server, args, pythons[method], refs[k], hogs
                )
                runs.append(run)
                status = run.error or (
                    f"wall {run.wall_s:.2f}s core {run.core_s:.2f}s cpu {run.cpu_s:.2f}s "
                    f"server cpu {run.server_cpu_s:.2f}s peak {run.peak_rss_mb:.0f}MB "
                    f"diff {run.max_abs_diff} (load {run.loadavg:.2f}, "
                    f"others' CPU {run.others_cpu_s:.1f}s)"
                )
                print(f"[r{repeat} k={k}] {method}: {status}", flush=True)
    return runs


def report(
    runs: Sequence[Run],
    methods: Sequence[str],
    ks: Sequence[int],
    meta: dict[str, Any],
    max_others_cpu: float | None = None,
) -> list[dict]:
    """Print the header line and the table; with ``max_others_cpu``, also the quiet runs only."""
    rows = summarise(runs, methods, ks)
    print()
    print(
        f"{meta['ingredients']} ingredients of {meta['params'] / 1e6:.1f}M "
        f"{'bfloat16' if meta.get('shape') == '7b' else 'float32'} params "
        f"({meta['nbytes'] / 1e6:.1f} MB each); ingredient 1 sharded differently; "
        f"{meta['repeats']} repeat(s), median shown; {meta['cpus']} CPUs, torch CPU; "
        f"{meta['code']}"
        + (f"; {meta['cpu_hogs']} CPU hog process(es)" if meta.get("cpu_hogs") else "")
        + (f"; worker env {' '.join(meta['worker_env'])}" if meta.get("worker_env") else "")
    )
    print(table(rows, meta["nbytes"]))
    if max_others_cpu is not None:
        quiet = [r for r in runs if (r.others_cpu_s or 0.0) <= max_others_cpu]
        print(
            f"\nOnly the {len(quiet)} of {len(runs)} runs during which other processes used at "
            f"most {max_others_cpu:g} CPU-seconds:"
        )
        print(table(summarise(quiet, methods, ks), meta["nbytes"]))
    return rows


def report_from_json(path: Path, max_others_cpu: float | None) -> int:
    """Re-print the tables of a finished run from its ``--json`` file."""
    data = json.loads(path.read_text())
    runs = [Run(**r) for r in data["runs"]]
    meta = data["meta"]
    methods = [m for m in METHODS if any(r.method == m for r in runs)]
    ks = sorted({r.k for r in runs})
    report(runs, methods, ks, meta, max_others_cpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
