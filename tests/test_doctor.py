"""`hfsoup inspect` as a pre-download doctor, and soups refused when tokenizers change token ids.

Ingredients are tiny BERTs of one init with real tokenizers (transformers' own save_pretrained),
changed the way fine-tunes change them: a token added, two vocab entries swapped, a different
model_max_length, a sentence-transformers pooling module.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from factories import load_state_dict, save_ingredient, tiny_bert_config
from greedy_fixtures import VOCAB, tokenizer
from safetensors.torch import load_file
from test_errors import assert_nothing_written, assert_one_line_error
from test_hostile_local import plain_average

import hfsoup
from hfsoup.errors import IncompatibleIngredientsError, TokenizerMismatchError

reliability = pytest.mark.reliability
PROBE = 64 * 1024  # the header probe of each weight file (hfsoup.io.tensors)


def ingredient(tmp_path, name: str, *, seed: int, tok=None, config=None):
    """A tiny BERT fine-tune saved with ``tok`` (default: the shared test tokenizer)."""
    folder = save_ingredient(tmp_path / name, config or tiny_bert_config(), seed=seed)
    (tok or tokenizer(tmp_path)).save_pretrained(folder)
    return folder


def swapped_tokenizer():
    """The test tokenizer with the ids of 'good' and 'bad' swapped."""
    from transformers import BertTokenizer

    vocab = {w: i for i, w in enumerate(VOCAB)}
    vocab["good"], vocab["bad"] = vocab["bad"], vocab["good"]
    return BertTokenizer(vocab=vocab)


def weight_requests(hub):
    """A rule that only records the requests for any repo's weight files (their Range headers)."""
    return hub.add_fault(path=r"/resolve/[^/]+/.*\.safetensors$", times=None)


@reliability(
    "Soup of ingredients whose tokenizers differ by an added token",
    "one line before any weight byte: '<b> differs from <a>: the tokenizers give 1 token(s) "
    "different ids, and a soup averages embedding rows by id: '[NEW]' (id 21 vs absent)' "
    "(TokenizerMismatchError); nothing written",
)
def test_a_soup_of_tokenizers_that_differ_by_an_added_token_is_refused(
    tmp_path, publish, cli, faulty_hub
):
    tok = tokenizer(tmp_path)
    a = publish(ingredient(tmp_path, "a", seed=1, tok=tok))[0]
    tok.add_tokens(["[NEW]"])
    b = publish(ingredient(tmp_path, "b", seed=2, tok=tok))[0]
    seen = weight_requests(faulty_hub)
    proc = cli("soup", a, b, "--output", tmp_path / "soup", "-q")
    assert_one_line_error(proc, f"{b} differs from {a}", "1 token(s)", "'[NEW]' (id 21 vs absent)")
    assert_nothing_written(tmp_path)
    assert all(r is not None and r.startswith("bytes=0-") for r in seen.ranges), seen.ranges
    assert len(seen.ranges) == 2  # the header probe of each ingredient, nothing more


@reliability(
    "Soup of ingredients whose vocabularies swap two token ids",
    "one line naming both tokens and their ids: \"... 2 token(s) different ids ...: 'good' "
    "(id 9 vs 5), 'bad' (id 5 vs 9)\" (TokenizerMismatchError); nothing written",
)
def test_a_soup_of_tokenizers_with_swapped_vocab_entries_is_refused(tmp_path, cli):
    a = ingredient(tmp_path, "a", seed=1)
    b = ingredient(tmp_path, "b", seed=2, tok=swapped_tokenizer())
    proc = cli("soup", a, b, "--output", tmp_path / "soup", "-q")
    good, bad = VOCAB.index("good"), VOCAB.index("bad")
    assert_one_line_error(
        proc, "2 token(s)", f"'good' (id {bad} vs {good})", f"'bad' (id {good} vs {bad})"
    )
    assert_nothing_written(tmp_path)


def test_the_python_api_raises_a_tokenizer_mismatch_as_incompatible(tmp_path):
    a = ingredient(tmp_path, "a", seed=1)
    b = ingredient(tmp_path, "b", seed=2, tok=swapped_tokenizer())
    with pytest.raises(TokenizerMismatchError) as caught:
        hfsoup.soup([a, b], output=tmp_path / "soup", progress=False)
    assert isinstance(caught.value, IncompatibleIngredientsError)
    report = hfsoup.inspect([a, b])
    assert not report.compatible and report.problem == str(caught.value)


def test_many_differing_tokens_are_named_first_few_and_counted(tmp_path, cli):
    from transformers import BertTokenizer

    a = ingredient(tmp_path, "a", seed=1)
    shifted = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *reversed(VOCAB[5:])]
    b = ingredient(tmp_path, "b", seed=2, tok=BertTokenizer(vocab={w: i for i, w in
                                                                   enumerate(shifted)}))  # fmt: skip
    proc = cli("inspect", a, b)
    moved = sum(x != y for x, y in zip(VOCAB, shifted, strict=True))
    assert_one_line_error(proc, f"{moved} token(s)", f"and {moved - 5} more")


def test_tokenizers_that_differ_only_in_model_max_length_soup_with_a_notice(tmp_path, cli):
    tok = tokenizer(tmp_path)
    tok.model_max_length = 512
    a = ingredient(tmp_path, "a", seed=1, tok=tok)
    tok.model_max_length = 16
    b = ingredient(tmp_path, "b", seed=2, tok=tok)
    report = hfsoup.inspect([a, b])
    assert report.compatible
    notes = [f for f in report.findings if f.topic == "tokenizer"]
    assert [f.level for f in notes] == ["note"]
    assert "model_max_length 16 vs 512" in notes[0].message
    proc = cli("soup", a, b, "--output", tmp_path / "soup", "-q")
    assert proc.returncode == 0, proc.stderr
    assert "model_max_length 16 vs 512" in proc.stderr
    soup = load_state_dict(tmp_path / "soup")
    for name, tensor in plain_average(a, b).items():
        torch.testing.assert_close(soup[name], tensor, rtol=0, atol=1e-6)
    # The first ingredient's tokenizer files are the soup's.
    saved = json.loads((tmp_path / "soup" / "tokenizer_config.json").read_text())
    assert saved["model_max_length"] == 512


def test_a_chat_template_in_one_ingredient_is_a_note(tmp_path):
    tok = tokenizer(tmp_path)
    a = ingredient(tmp_path, "a", seed=1, tok=tok)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    b = ingredient(tmp_path, "b", seed=2, tok=tok)
    report = hfsoup.inspect([a, b])
    assert report.compatible
    assert [(f.level, f.topic) for f in report.findings] == [("note", "tokenizer")]
    assert "chat template" in report.findings[0].message
    rows = report.to_dict()["ingredients"]
    assert [r["tokenizer"]["chat_template"] for r in rows] == [False, True]


def test_inspect_json_holds_the_whole_report(tmp_path, publish, cli):
    repos = [publish(ingredient(tmp_path, f"i{i}", seed=i + 1))[0] for i in range(2)]
    proc = cli("inspect", *repos, "--json", "--method", "greedy", "--bandwidth", "10MB/s")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert {"compatible", "problem", "ingredients", "findings", "estimate"} <= report.keys()
    assert report["compatible"] is True and report["findings"] == []
    row = report["ingredients"][0]
    assert {"ingredient", "repo", "sha", "parameters", "bytes", "dtypes", "model_type",
            "architectures", "format", "tokenizer", "labels", "layout", "dtype_bytes",
            "weight_files", "weight_bytes", "cached_bytes", "local"} <= row.keys()  # fmt: skip
    assert row["tokenizer"]["vocab_size"] == len(VOCAB)
    assert row["tokenizer"]["special_tokens"]["pad_token"] == "[PAD]"
    assert row["labels"] == {"0": "negative", "1": "positive"}
    assert row["layout"] == {"kind": "transformers", "files": [], "pooling": None}
    assert row["dtype_bytes"] == {"F32": row["bytes"]}
    est = report["estimate"]
    assert est["method"] == "greedy" and est["estimate"] is True and est["bandwidth"] == 10**7
    assert {"download_bytes", "peak_memory_bytes", "available_memory_bytes", "seconds",
            "fits", "assumes", "device"} <= est.keys()  # fmt: skip


def test_inspect_reads_no_weight_byte_past_each_header_probe(tmp_path, publish, cli, faulty_hub):
    # Files of ~150 KiB, so most of their weights lie past the 64 KiB header probe.
    config = tiny_bert_config(vocab_size=2048)
    repos = [publish(ingredient(tmp_path, f"i{i}", seed=i + 1, config=config))[0]
             for i in range(2)]  # fmt: skip
    assert (tmp_path / "i0" / "model.safetensors").stat().st_size > 2 * PROBE
    seen = weight_requests(faulty_hub)
    proc = cli("inspect", *repos, "--json")
    assert proc.returncode == 0, proc.stderr
    assert seen.ranges == [f"bytes=0-{PROBE - 1}"] * 2
    assert json.loads(proc.stdout)["ingredients"][1]["tokenizer"]["vocab_size"] == len(VOCAB)


def test_download_size_and_time_are_the_hubs_file_sizes_over_the_bandwidth(tmp_path, publish, api):
    repos = [publish(ingredient(tmp_path, f"i{i}", seed=i + 1))[0] for i in range(3)]
    total = sum(
        s.size
        for r in repos
        for s in api.model_info(r, files_metadata=True).siblings
        if s.rfilename.endswith(".safetensors")
    )
    assert total > 0
    est = hfsoup.inspect([*repos, tmp_path / "i0"], bandwidth="1MB").estimate
    assert est["download_bytes"] == total
    assert est["local_bytes"] == (tmp_path / "i0" / "model.safetensors").stat().st_size
    assert est["seconds"] == pytest.approx(total / 1e6 + est["local_bytes"] / 500e6, abs=0.05)


def test_greedy_downloads_only_what_the_hf_cache_lacks(tmp_path, publish):
    from hfsoup.io.hub import parse_ingredient, resolve

    repos = [publish(ingredient(tmp_path, f"i{i}", seed=i + 1))[0] for i in range(2)]
    resolve(parse_ingredient(repos[0])).source.local_file("model.safetensors")  # now cached
    sizes = [(tmp_path / f"i{i}" / "model.safetensors").stat().st_size for i in range(2)]
    greedy = hfsoup.inspect(repos, method="greedy")
    assert [r["cached_bytes"] for r in greedy.to_dict()["ingredients"]] == [sizes[0], 0]
    assert greedy.estimate["download_bytes"] == sizes[1]
    # A uniform soup streams (and hashes) every Hub byte, cached or not.
    assert hfsoup.inspect(repos).estimate["download_bytes"] == sum(sizes)


def test_uniform_memory_estimate_is_reads_in_flight_plus_one_chunk(tmp_path):
    folders = [ingredient(tmp_path, f"i{i}", seed=i + 1) for i in range(2)]
    tensors = load_file(folders[0] / "model.safetensors")
    # A tiny model is one chunk (under 8 MiB of float32 sums): its sums and its output bytes.
    out = sum(t.numel() * t.element_size() for t in tensors.values())
    acc = 4 * sum(t.numel() for t in tensors.values())
    read = sum((f / "model.safetensors").stat().st_size for f in folders)
    est = hfsoup.inspect(folders).estimate
    assert est["peak_memory_bytes"] == min(32 * 2**20 + 2 * acc, read) + acc + out
    assert est["download_bytes"] == 0 and est["fits"] is True
    half = hfsoup.inspect(folders, dtype="float16").estimate["peak_memory_bytes"]
    assert half < est["peak_memory_bytes"]


def test_greedy_memory_estimate_is_the_live_model_and_one_float32_sum(tmp_path):
    folders = [ingredient(tmp_path, f"i{i}", seed=i + 1) for i in range(3)]
    tensors = load_file(folders[0] / "model.safetensors")
    params = sum(t.numel() for t in tensors.values() if t.is_floating_point())
    read = sum(t.numel() * t.element_size() for t in tensors.values())
    buffers = sum(
        t.numel() * t.element_size() for t in tensors.values() if not t.is_floating_point()
    )
    est = hfsoup.inspect(folders, method="greedy").estimate
    # The live model and the sum in float32 (integer buffers as they are), one ingredient read.
    assert est["peak_memory_bytes"] == 2 * 4 * params + 2 * buffers + read


def test_learned_memory_estimate_is_the_learned_soups_own(tmp_path):
    from hfsoup.check.estimates import activation_bytes

    folders = [ingredient(tmp_path, f"i{i}", seed=i + 1) for i in range(2)]
    tensors = load_file(folders[0] / "model.safetensors")
    model = 4 * sum(t.numel() for t in tensors.values() if t.is_floating_point())
    config = json.loads((folders[0] / "config.json").read_text())
    est = hfsoup.inspect(folders, method="learned").estimate
    assert est["learned_path"] == "memory"  # a tiny model fits
    acts = activation_bytes(config, batch_size=32, max_length=128)
    assert est["peak_memory_bytes"] == (2 + 3) * model + acts


def test_the_text_report_names_tokenizer_labels_layout_and_the_estimate(tmp_path, cli):
    folders = [ingredient(tmp_path, f"i{i}", seed=i + 1) for i in range(2)]
    proc = cli("inspect", *folders, "--method", "uniform")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"tokenizer: vocab {len(VOCAB)} (tokenizer.json), 5 added tokens" in out
    assert "labels: negative, positive  layout: transformers" in out
    assert re.search(r"estimate for a uniform soup on this machine \(cpu\): download 0 B", out)
    assert "an estimate, assuming" in out and "an assumed 50.0 MB/s" in out
    assert out.rstrip().endswith("compatible: yes")


def sentence_transformers_layout(folder, *, mode: str) -> None:
    """Give ``folder`` the module files of a sentence-transformers model pooling by ``mode``."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling"}]  # fmt: skip
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": 16, "pooling_mode_cls_token": mode == "cls",
               "pooling_mode_mean_tokens": mode == "mean"}  # fmt: skip
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))


def test_a_different_pooling_module_is_a_warning_naming_both(tmp_path):
    a = ingredient(tmp_path, "a", seed=1)
    b = ingredient(tmp_path, "b", seed=2)
    sentence_transformers_layout(a, mode="mean")
    sentence_transformers_layout(b, mode="cls")
    report = hfsoup.inspect([a, b])
    rows = report.to_dict()["ingredients"]
    assert [r["layout"]["pooling"] for r in rows] == ["mean", "cls"]
    assert rows[0]["layout"]["kind"] == "sentence-transformers"
    assert rows[0]["layout"]["files"] == ["1_Pooling/config.json", "modules.json"]
    messages = [f.message for f in report.findings if f.topic == "layout"]
    assert any("pooling cls vs mean" in m for m in messages), messages
    assert any("1_Pooling/config.json differs" in m for m in messages), messages


def test_pooling_written_as_a_list_is_reported_as_the_layout_check_reads_it(tmp_path):
    # sentence-transformers also writes pooling_mode as a string or a list; the report shows the
    # same modes the layout check compares (the legacy boolean form gives the same answer).
    a = ingredient(tmp_path, "a", seed=1)
    b = ingredient(tmp_path, "b", seed=2)
    sentence_transformers_layout(a, mode="mean")
    sentence_transformers_layout(b, mode="mean")
    (b / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 16, "pooling_mode": ["mean"]})
    )
    from hfsoup.check.doctor import render

    report = hfsoup.inspect([a, b]).to_dict()
    assert [r["layout"]["pooling"] for r in report["ingredients"]] == ["mean", "mean"]
    assert render(report).count("pooling mean") == 2


def test_a_layout_file_in_one_ingredient_only_is_a_warning(tmp_path):
    a = ingredient(tmp_path, "a", seed=1)
    b = ingredient(tmp_path, "b", seed=2)
    sentence_transformers_layout(a, mode="mean")
    report = hfsoup.inspect([a, b])
    messages = [f.message for f in report.findings if f.level == "warning"]
    assert any("modules.json is in only the first" in m for m in messages), messages


def test_labels_in_another_order_are_a_note(tmp_path):
    a = ingredient(tmp_path, "a", seed=1)
    flipped = tiny_bert_config(id2label={0: "positive", 1: "negative"},
                               label2id={"positive": 0, "negative": 1})  # fmt: skip
    b = ingredient(tmp_path, "b", seed=2, config=flipped)
    report = hfsoup.inspect([a, b])
    assert report.compatible
    assert [(f.level, f.topic) for f in report.findings] == [("note", "labels")]
    assert [r["labels"] for r in report.to_dict()["ingredients"]] == [
        {"0": "negative", "1": "positive"},
        {"0": "positive", "1": "negative"},
    ]


def test_ingredients_without_tokenizer_files_are_examined_without_complaint(tmp_path):
    folders = [save_ingredient(tmp_path / f"i{i}", tiny_bert_config(), seed=i + 1)
               for i in range(2)]  # fmt: skip
    report = hfsoup.inspect(folders)
    assert report.compatible and report.findings == []
    assert report.to_dict()["ingredients"][0]["tokenizer"]["files"] == []


@reliability(
    "Ingredient whose tokenizer.json is not valid JSON",
    "one line naming the file: '<ing>/tokenizer.json: not valid JSON (...)' "
    "(CorruptWeightsError), before any weight byte; nothing written",
)
def test_a_tokenizer_file_that_is_not_json_is_one_line(tmp_path, cli):
    a = ingredient(tmp_path, "a", seed=1)
    b = ingredient(tmp_path, "b", seed=2)
    (b / "tokenizer.json").write_text("{not json")
    proc = cli("soup", a, b, "--output", tmp_path / "soup", "-q")
    assert_one_line_error(proc, f"{b}/tokenizer.json", "not valid JSON")
    assert_nothing_written(tmp_path)


def test_the_space_shows_the_same_report(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "space_app"))
    from logic import inspection_report

    from hfsoup.check.doctor import render

    tok = tokenizer(tmp_path)
    a = ingredient(tmp_path, "a", seed=1, tok=tok)
    tok.add_tokens(["[NEW]"])
    b = ingredient(tmp_path, "b", seed=2, tok=tok)
    report = hfsoup.inspect([a, b]).to_dict()
    shown = inspection_report(report)
    assert render(report) in shown
    assert "error: " in shown and "'[NEW]'" in shown and "compatible: NO" in shown


def test_an_unreadable_bandwidth_is_one_line(tmp_path, cli):
    a = ingredient(tmp_path, "a", seed=1)
    proc = cli("inspect", a, "--bandwidth", "fast")
    assert_one_line_error(proc, "bandwidth: cannot read 'fast' as a size")


# Peak RSS growth (bytes) of a uniform soup with default options, above a warmed-up baseline.
_MEASURE = """
import json, sys
import hfsoup
dirs, out, tiny = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
hfsoup.soup([tiny, tiny], output=out + "-warm", progress=False)  # warm imports and pools
def hwm():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark (Linux >= 4.0)
before = hwm()
hfsoup.soup(dirs, output=out, progress=False)
print(json.dumps({"growth": hwm() - before}))
"""


def test_the_uniform_memory_estimate_bounds_the_measured_peak(tmp_path):
    import subprocess
    import sys

    config = tiny_bert_config(hidden_size=384, intermediate_size=1536, num_hidden_layers=4,
                              vocab_size=512, num_attention_heads=4, max_position_embeddings=64)  # fmt: skip
    dirs = [save_ingredient(tmp_path / f"m{i}", config, seed=i + 1) for i in range(2)]
    tiny = save_ingredient(tmp_path / "tiny", tiny_bert_config(), seed=0)
    estimate = hfsoup.inspect(dirs).estimate["peak_memory_bytes"]
    args = [json.dumps([str(d) for d in dirs]), str(tmp_path / "soup"), str(tiny)]
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *args], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    growth = json.loads(proc.stdout.strip().splitlines()[-1])["growth"]
    # An upper bound (it adds what is held at different moments), and not a loose one.
    assert estimate / 3 < growth <= estimate, (growth, estimate)
