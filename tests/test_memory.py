"""Peak memory of a uniform soup does not grow with the number of ingredients."""

from __future__ import annotations

import json
import subprocess
import sys

from factories import save_ingredient, tiny_bert_config

# One ingredient is ~28 MB of float32; the fetch budget and output shards are far smaller, so
# holding even one extra ingredient would show in the peak. (The allocator's own run-to-run
# noise in this measurement is up to ~8 MB, so ingredients must be well above that.)
_CONFIG = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=4, vocab_size=512,
               num_attention_heads=4, max_position_embeddings=64)  # fmt: skip

# Peak RSS growth (KB) of one soup above a warmed-up baseline, in a fresh interpreter.
_PROBE = """
import json, sys
import hfsoup
from hfsoup.api import build_recipe, run
dirs, out, tiny, mode = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
# Warm imports and allocator pools on a tiny model, far below the peak being measured.
hfsoup.soup([tiny, tiny], output=out + "-warm", progress=False)
def hwm_kb():
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0])
# Reset the peak-RSS high-water mark (Linux >= 4.0), so import-time peaks do not hide ours.
open("/proc/self/clear_refs", "w").write("5")
before = hwm_kb()
if mode == "stream":
    recipe = build_recipe({"ingredients": dirs, "output": {"dir": out, "max_shard_size": "2MB"}})
    run(recipe, progress=False, max_in_flight=2 * 1024 * 1024)
else:  # the naive way, as a control: every ingredient fully loaded, then averaged
    from safetensors.torch import load_file
    sds = [load_file(d + "/model.safetensors") for d in dirs]
    avg = {k: sum(sd[k] for sd in sds) / len(sds) for k in sds[0]}
after = hwm_kb()
print(json.dumps({"growth_kb": after - before}))
"""


def _peak_growth_kb(dirs, out, tiny, mode="stream") -> int:
    args = [json.dumps([str(d) for d in dirs]), str(out), str(tiny), mode]
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])["growth_kb"]


def test_peak_memory_is_flat_in_the_number_of_ingredients(tmp_path):
    config = tiny_bert_config(**_CONFIG)
    dirs = [save_ingredient(tmp_path / f"m{i}", config, seed=i + 1) for i in range(8)]
    tiny = save_ingredient(tmp_path / "tiny", tiny_bert_config(), seed=0)
    ingredient_kb = sum(p.stat().st_size for p in dirs[0].glob("*.safetensors")) // 1024
    two = _peak_growth_kb(dirs[:2], tmp_path / "two", tiny)
    eight = _peak_growth_kb(dirs, tmp_path / "eight", tiny)
    naive = _peak_growth_kb(dirs, tmp_path / "naive", tiny, mode="naive")
    # The measurement can see ingredients: loading all eight shows most of them.
    assert naive > 6 * ingredient_kb, (naive, ingredient_kb)
    # Streaming 8 instead of 2 adds less than half of one ingredient.
    assert eight - two < ingredient_kb // 2, (two, eight, ingredient_kb)
