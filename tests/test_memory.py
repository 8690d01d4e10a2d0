"""Peak memory of a uniform soup does not grow with the number of ingredients, the output shard
size or the size of a tensor; a uniform soup imports neither transformers nor datasets."""

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
shard, in_flight = sys.argv[5], json.loads(sys.argv[6])
# Warm imports and allocator pools on a tiny model, far below the peak being measured.
hfsoup.soup([tiny, tiny], output=out + "-warm", progress=False)
def hwm_kb():
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0])
# Reset the peak-RSS high-water mark (Linux >= 4.0), so import-time peaks do not hide ours.
open("/proc/self/clear_refs", "w").write("5")
before = hwm_kb()
if mode == "stream":
    recipe = build_recipe({"ingredients": dirs, "output": {"dir": out, "max_shard_size": shard}})
    run(recipe, progress=False, max_in_flight=in_flight)
else:  # the naive way, as a control: every ingredient fully loaded, then averaged
    from safetensors.torch import load_file
    sds = [load_file(d + "/model.safetensors") for d in dirs]
    avg = {k: sum(sd[k] for sd in sds) / len(sds) for k in sds[0]}
after = hwm_kb()
print(json.dumps({"growth_kb": after - before}))
"""


def _peak_growth_kb(dirs, out, tiny, mode="stream", shard="2MB", in_flight=2 * 2**20) -> int:
    args = [json.dumps([str(d) for d in dirs]), str(out), str(tiny), mode, shard,
            json.dumps(in_flight)]  # fmt: skip
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


# One ingredient holding a single 80 MiB float32 embedding (40960 x 512) and little else.
_BIG_EMBEDDING = dict(hidden_size=512, intermediate_size=512, num_hidden_layers=1,
                      vocab_size=40960, num_attention_heads=4, max_position_embeddings=64)  # fmt: skip


def test_peak_memory_is_bounded_whatever_the_shard_and_tensor_size(tmp_path):
    dirs = [save_ingredient(tmp_path / f"m{i}", tiny_bert_config(**_BIG_EMBEDDING), seed=i + 1)
            for i in range(2)]  # fmt: skip
    tiny = save_ingredient(tmp_path / "tiny", tiny_bert_config(), seed=0)
    ingredient_kb = sum(p.stat().st_size for p in dirs[0].glob("*.safetensors")) // 1024
    # Default settings (5GB shards: the whole soup in one output shard; 32 MiB read-ahead).
    whole = _peak_growth_kb(dirs, tmp_path / "whole", tiny, shard="5GB", in_flight=None)
    small = _peak_growth_kb(dirs, tmp_path / "small", tiny, shard="2MB", in_flight=None)
    # Holding the soup's float32 sums (one output shard, or just the embedding) would be a whole
    # ingredient (~88 MB) on its own, twice that with its cast. The read-ahead (32 MiB), the
    # read being added, one 8 MiB chunk of sums and its cast stay below: measured 48-56 MB
    # (5GB) and 56-64 MB (2MB) over 3 runs each, in steps of 8 MB (the chunk-sized maps).
    assert max(whole, small) < 72 * 1024 < ingredient_kb, (whole, small, ingredient_kb)
    assert abs(whole - small) < 16 * 1024, (whole, small)


_IMPORTS = """
import json, sys
from hfsoup.cli import main
code = main(sys.argv[1:])
print(json.dumps([code, sorted(m for m in ("transformers", "datasets", "accelerate")
                               if m in sys.modules)]))
"""


def test_a_uniform_soup_from_the_hub_imports_no_transformers_or_datasets(hub, publish, tmp_path):
    repos = [publish(save_ingredient(tmp_path / f"i{i}", tiny_bert_config(), seed=i + 1))[0]
             for i in range(2)]  # fmt: skip
    args = ["soup", *repos, "--output", str(tmp_path / "soup"), "-q"]
    proc = subprocess.run([sys.executable, "-c", _IMPORTS, *args], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    code, imported = json.loads(proc.stdout.strip().splitlines()[-1])
    assert code == 0 and (tmp_path / "soup" / "model.safetensors").is_file()
    assert imported == [], imported
