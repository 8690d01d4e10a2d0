"""Soups of LoRA adapters: hfsoup (full output, adapter output) against peft merge-then-average.

The script saves a GPT-2-shaped base (random init, float32, local folder) and ``k`` LoRA
adapters of it made with ``peft`` (rank ``--rank`` on c_attn, c_proj and c_fc, random non-zero
A and B), then runs each method in a fresh subprocess:

* ``hfsoup``: ``hfsoup.soup(adapters, output=...)``: the full merged model θ₀ + mean ΔW;
* ``hfsoup-adapter``: the same with ``output_adapter=True`` (rank ``--rank``: SVD per module);
* ``peft``: load the base, ``PeftModel.from_pretrained(...).merge_and_unload()`` per adapter,
  average the state dicts in float32 (one merged model plus the running sum at a time), save.

Peak RSS is each worker's ``VmHWM``; wall time is measured by the parent from spawn to exit
(interpreter start and imports included). The hfsoup soup is compared with peft's (max |diff|).

Example:
    python benchmarks/bench_lora.py --k 4 --layers 12 --width 768 --rank 16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

WORKER = r"""
import json, sys, time
from pathlib import Path
method, base, out, *adapters = sys.argv[1:]
t0 = time.perf_counter()
if method.startswith("hfsoup"):
    import hfsoup
    hfsoup.soup(adapters, output=out, progress=False, output_adapter=method == "hfsoup-adapter")
else:
    import torch
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import GPT2LMHeadModel
    avg = None
    for folder in adapters:
        merged = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), folder)
        state = merged.merge_and_unload().state_dict()
        if avg is None:
            avg = {k: v.float() / len(adapters) for k, v in state.items()}
        else:
            for k, v in state.items():
                avg[k] += v.float() / len(adapters)
        del merged, state
    avg.pop("lm_head.weight", None)  # tied to wte
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in avg.items()}, str(Path(out) / "model.safetensors"))
core = time.perf_counter() - t0
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"core_s": core, "peak_rss_mb": hwm / 1024}))
"""


def build(work: Path, *, k: int, layers: int, width: int, rank: int) -> tuple[Path, list[Path]]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    base = work / "base"
    if not (base / "model.safetensors").exists():
        torch.manual_seed(0)
        config = GPT2Config(n_layer=layers, n_embd=width, n_head=max(1, width // 64))
        GPT2LMHeadModel(config).save_pretrained(base)
    adapters = []
    for i in range(k):
        folder = work / f"adapter{i}"
        if not (folder / "adapter_model.safetensors").exists():
            torch.manual_seed(100 + i)
            model = get_peft_model(
                GPT2LMHeadModel.from_pretrained(base),
                LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                           target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
            )  # fmt: skip
            model.save_pretrained(folder)
            config = json.loads((folder / "adapter_config.json").read_text())
            config["base_model_name_or_path"] = str(base)
            (folder / "adapter_config.json").write_text(json.dumps(config))
        adapters.append(folder)
    return base, adapters


def run(method: str, base: Path, out: Path, adapters: list[Path]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WORKER, method, str(base), str(out),
                           *map(str, adapters)], capture_output=True, text=True)  # fmt: skip
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{method} failed:\n{proc.stderr}")
    return {"method": method, "wall_s": wall, **json.loads(proc.stdout.strip().splitlines()[-1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--workdir", type=Path, default=Path(".bench/lora"))
    args = p.parse_args()
    import shutil

    from safetensors.torch import load_file

    base, adapters = build(args.workdir, k=args.k, layers=args.layers, width=args.width,
                           rank=args.rank)  # fmt: skip
    size = (base / "model.safetensors").stat().st_size / 1e6
    rows = []
    for method in ("hfsoup", "hfsoup-adapter", "peft"):
        out = args.workdir / f"out-{method}"
        shutil.rmtree(out, ignore_errors=True)
        rows.append(run(method, base, out, adapters))
    soup = load_file(args.workdir / "out-hfsoup" / "model.safetensors")
    ref = load_file(args.workdir / "out-peft" / "model.safetensors")
    diff = max((soup[n] - ref[n]).abs().max().item() for n in ref)
    err = json.loads((args.workdir / "out-hfsoup-adapter" / "results.json").read_text())
    err = err["lora"]["output_adapter"]["relative_frobenius_error"]
    print(f"base {size:.0f} MB float32, k = {args.k} adapters of rank {args.rank}")
    print("| method | wall s | core s | peak RSS MB |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['wall_s']:.2f} | {r['core_s']:.2f} | {r['peak_rss_mb']:.0f} |")
    print(f"max |hfsoup - peft| = {diff:.2e}; adapter output (rank {args.rank}): relative "
          f"Frobenius error max {err['max']:.4f}, mean {err['mean']:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
