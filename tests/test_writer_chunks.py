"""The constant-memory writer: header first, then rows at their offsets, byte for byte what
``safetensors.torch.save_file`` writes; a soup cut into row chunks equals one that is not."""

from __future__ import annotations

import math

import pytest
import torch
from factories import load_state_dict, save_ingredient, tiny_bert_config
from safetensors.torch import load_file, save_file

import hfsoup
from hfsoup.errors import NonFiniteWeightsError
from hfsoup.io import chunks
from hfsoup.io.shards import SafetensorsOut, ShardWriter
from hfsoup.io.tensors import IngredientIndex, TensorRef


def _random_tensors(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (3,), (), (0, 4), (11, 2, 3), (1,)]
    dtypes = [torch.bfloat16, torch.float16, torch.float32, torch.int64, torch.float64,
              torch.int8, torch.bool, torch.uint8, torch.int32]  # fmt: skip
    out = {}
    for i, dtype in enumerate(dtypes):
        for j, shape in enumerate(shapes):
            if dtype.is_floating_point:
                t = torch.randn(shape, generator=gen).to(dtype)
            else:
                t = torch.randint(0, 2 if dtype == torch.bool else 100, shape, generator=gen)
                t = t.to(dtype)
            # Names that sort differently by code point than by length or case.
            out[f"{'ZaB'[i % 3]}layer.{j}.w{i}" + ("é" if (i + j) % 4 == 0 else "")] = t
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_whole_tensors_are_written_as_save_file_writes_them(tmp_path, seed):
    tensors = _random_tensors(seed)
    save_file(tensors, tmp_path / "expected.safetensors", metadata={"format": "pt"})
    writer = ShardWriter(tmp_path, 1)
    writer.write(0, tensors)
    writer.finish()
    written = (tmp_path / "model.safetensors").read_bytes()
    assert written == (tmp_path / "expected.safetensors").read_bytes()
    assert writer.total_size == sum(t.numel() * t.element_size() for t in tensors.values())


def test_rows_written_out_of_order_give_the_same_bytes(tmp_path):
    tensors = _random_tensors(2)
    save_file(tensors, tmp_path / "expected.safetensors", metadata={"format": "pt"})
    specs = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    out = SafetensorsOut(tmp_path / "chunked.safetensors", specs)
    # Last tensor first, each tensor of two or more rows one row at a time, last row first.
    for name, t in reversed(tensors.items()):
        if t.dim() == 0 or t.shape[0] < 2:
            out.write(name, t)
            continue
        for row in reversed(range(t.shape[0])):
            out.write(name, t[row : row + 1], row)
    out.close()
    expected = (tmp_path / "expected.safetensors").read_bytes()
    assert (tmp_path / "chunked.safetensors").read_bytes() == expected


def test_a_file_with_rows_missing_is_not_closed_as_complete(tmp_path):
    t = torch.arange(12.0).reshape(4, 3)
    out = SafetensorsOut(tmp_path / "x.safetensors", {"t": (t.dtype, (4, 3))})
    out.write("t", t[:3])
    with pytest.raises(AssertionError, match="36 of 48 bytes"):
        out.close()


def test_a_nonfinite_chunk_is_refused_naming_its_tensor(tmp_path):
    writer = ShardWriter(tmp_path, 1)
    writer.begin(0, {"ok": (torch.float16, (2,)), "bad": (torch.float16, (2,))})
    writer.write_chunk("ok", torch.ones(2, dtype=torch.float16))
    with pytest.raises(NonFiniteWeightsError, match="'bad'.*float16"):
        writer.write_chunk("bad", torch.tensor([1.0, float("inf")], dtype=torch.float16))
    writer.abort()


def _index(shapes: dict[str, tuple[int, ...]], heads=frozenset()) -> IngredientIndex:
    refs, pos = {}, 0
    for name, shape in shapes.items():
        end = pos + 4 * math.prod(shape)
        refs[name] = TensorRef(name, "model.safetensors", "F32", shape, pos, end)
        pos = end
    return IngredientIndex(None, refs, {}, head_tensors=frozenset(heads))


def test_large_tensors_are_cut_into_rows_and_small_ones_grouped():
    ix = _index({"emb": (1000, 16), "a": (4,), "b": (8,), "c": (30, 2), "head": (500, 16)},
                heads={"head"})  # fmt: skip
    plan = chunks.plan_chunks([ix], [["emb", "a", "b"], ["c", "head"]], chunk_bytes=1024)
    emb = [c.pieces[0] for c in plan if c.pieces[0].name == "emb"]
    # 1024 bytes of float32 sum = 16 rows of 16; the rows cover the tensor once, in order.
    assert [(p.row, p.rows) for p in emb] == [(r, 16) for r in range(0, 992, 16)] + [(992, 8)]
    assert [c.pieces for c in plan if c.pieces[0].name == "a"] == [
        (chunks.Piece("a"), chunks.Piece("b"))
    ]
    # A head whose rows may be reordered is never cut; a chunk never spans two shards.
    assert chunks.Chunk(1, (chunks.Piece("head"),)) in plan
    assert all(c.shard == (0 if c.pieces[0].name in ("emb", "a") else 1) for c in plan)
    ref = chunks._piece_ref(ix.tensors["emb"], emb[1])
    assert (ref.start, ref.end, ref.shape) == (16 * 64, 32 * 64, (16, 16))


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_a_soup_cut_into_row_chunks_equals_one_in_whole_tensors(tmp_path, monkeypatch, dtype):
    config = tiny_bert_config()
    ings = [save_ingredient(tmp_path / f"ing{i}", config, seed=i + 1) for i in range(3)]
    kwargs = dict(progress=False, dtype=dtype, max_shard_size="8KB", weights=[3, 1, 2])
    hfsoup.soup(ings, output=tmp_path / "whole", **kwargs)
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 300)  # every matrix is cut into rows
    hfsoup.soup(ings, output=tmp_path / "rows", **kwargs)
    whole = sorted(p.name for p in (tmp_path / "whole").glob("*.safetensors"))
    assert len(whole) > 1
    assert whole == sorted(p.name for p in (tmp_path / "rows").glob("*.safetensors"))
    for name in [*whole, "model.safetensors.index.json"]:
        assert (tmp_path / "rows" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    # And each file written row chunk by row chunk is what save_file writes for its tensors.
    from safetensors import safe_open

    for name in whole:
        path = tmp_path / "rows" / name
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
        save_file(load_file(path), tmp_path / "expected.safetensors", metadata=metadata)
        assert path.read_bytes() == (tmp_path / "expected.safetensors").read_bytes(), name
    # And the bytes are an average: the first shard's tensors are the weighted mean.
    states = [load_file(next(p.glob("*.safetensors"))) for p in ings]
    soup = load_file(tmp_path / "rows" / whole[0])
    key = next(k for k, v in soup.items() if v.is_floating_point() and v.dim() == 2)
    mean = sum(w * s[key].float() for w, s in zip([0.5, 1 / 6, 1 / 3], states, strict=True))
    torch.testing.assert_close(soup[key].float(), mean.to(soup[key].dtype).float())


def test_row_chunks_streamed_from_the_hub_are_verified_and_equal_a_local_soup(
    bert_soup_ingredients, tmp_path, monkeypatch
):
    # Three repos, the second sharded differently (read out of order: downloaded and checked),
    # the others hashed as their row chunks stream past, interleaved ingredient by ingredient.
    repos, dirs = bert_soup_ingredients
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 300)
    hfsoup.soup(repos, output=tmp_path / "hub", progress=False, max_shard_size="8KB")
    hfsoup.soup(dirs, output=tmp_path / "local", progress=False, max_shard_size="8KB")
    names = sorted(p.name for p in (tmp_path / "local").glob("model*"))
    assert len(names) > 2 and names == sorted(p.name for p in (tmp_path / "hub").glob("model*"))
    for name in names:
        assert (tmp_path / "hub" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()


def test_a_row_chunk_served_shifted_is_refused_and_nothing_is_written(
    bert_soup_ingredients, faulty_hub, tmp_path, monkeypatch
):
    from test_errors import assert_nothing_written
    from test_reliability_network import weights_path

    from hfsoup.errors import CorruptWeightsError

    repos, _ = bert_soup_ingredients
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 300)
    # The header probe and the first streamed chunks pass; a read in the middle is shifted.
    fault = faulty_hub.add_fault(
        method="GET", path=weights_path(repos[2]), skip=6, times=None, shift_bytes=8
    )
    with pytest.raises(CorruptWeightsError, match=f"{repos[2]}: model.safetensors.*refused"):
        hfsoup.soup(repos, output=tmp_path / "soup", progress=False, max_shard_size="8KB")
    assert fault.hits > 1
    assert_nothing_written(tmp_path)


def test_pickled_ingredients_are_averaged_a_shard_at_a_time():
    # A pickle file is loaded whole (a cache of two files): chunks interleaving three pickled
    # ingredients would load each file once per chunk.
    big = _index({"emb": (1000, 16), "a": (4,)})
    pickled = IngredientIndex(None, big.tensors, {}, pickle=True)
    plan = chunks.plan_chunks([big, pickled, big], [["emb"], ["a"]], chunk_bytes=1024)
    assert plan == [chunks.Chunk(0, (chunks.Piece("emb"),)), chunks.Chunk(1, (chunks.Piece("a"),))]


def test_a_two_pass_method_over_row_chunks_from_the_hub_equals_plain_torch(
    tmp_path, monkeypatch, publish, cli
):
    """The accumulator seam joined with chunk streaming: a two-pass method (pass 0 elects signs,
    pass 1 averages the agreeing values) over matrices cut into rows, read from the Hub (each
    file hashed as it streams, its bytes read twice), gives what plain torch computes on whole
    tensors; integer buffers are the first ingredient's; the progress total is every read."""
    from test_method_registry import SignElectedMean, _streamed

    from hfsoup.compute import combine
    from hfsoup.registry import MergeMethod, register, unregister

    dirs = [save_ingredient(tmp_path / f"ing{i}", tiny_bert_config(), seed=90 + i,
                            max_shard_size="8KB" if i == 1 else "5GB") for i in range(3)]  # fmt: skip
    repos = [publish(d)[0] for d in dirs]
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 300)  # every matrix is cut into rows
    seen = {"bytes": 0, "total": 0}
    real_combine, real_plan = combine.stream_combine, combine.fetch_plan_bytes

    def counted_combine(*args, on_bytes=None, **kwargs):
        def count(n: int) -> None:
            seen["bytes"] += n

        return real_combine(*args, on_bytes=count, **kwargs)

    def counted_plan(*args, **kwargs):
        seen["total"] = real_plan(*args, **kwargs)
        return seen["total"]

    monkeypatch.setattr(combine, "stream_combine", counted_combine)
    monkeypatch.setattr(combine, "fetch_plan_bytes", counted_plan)
    cut = []

    def recorded_plan(*args, **kwargs):
        cut.append(chunks.plan_chunks(*args, **kwargs))
        return cut[-1]

    monkeypatch.setattr(combine, "plan_chunks", recorded_plan)
    register(MergeMethod("toy-signs-rows", "two passes", run=_streamed(SignElectedMean)))
    try:
        proc = cli("soup", *repos, "--method", "toy-signs-rows", "--output", tmp_path / "soup",
                   "-q")  # fmt: skip
    finally:
        unregister("toy-signs-rows")
    assert proc.returncode == 0, proc.stderr
    # Each pass is hashed as it streams: no file is downloaded whole for being read twice.
    assert "cannot be hashed on the way" not in proc.stderr, proc.stderr
    assert any(p.rows is not None for c in cut[-1] for p in c.pieces)  # rows were cut
    sds = [load_state_dict(d) for d in dirs]
    soup = load_state_dict(tmp_path / "soup")
    assert soup.keys() == sds[0].keys()
    for name, first in sds[0].items():
        if not first.is_floating_point():
            assert torch.equal(soup[name], first), name
            continue
        stacked = torch.stack([sd[name].float() for sd in sds])
        agrees = torch.sign(stacked) == torch.sign(stacked.sum(dim=0))
        expected = (stacked * agrees).sum(dim=0) / agrees.sum(dim=0).clamp(min=1)
        torch.testing.assert_close(soup[name], expected.to(first.dtype), msg=name)
    floats = sum(t.numel() * t.element_size() for sd in sds for t in sd.values()
                 if t.is_floating_point())  # fmt: skip
    ints = sum(t.numel() * t.element_size() for t in sds[0].values() if not t.is_floating_point())
    # Every float byte twice (two passes), integer buffers once, and the bar's total is that.
    assert seen["bytes"] == seen["total"] == 2 * floats + ints


def test_bytes_read_again_in_a_later_pass_are_checked_again(
    tmp_path, monkeypatch, publish, faulty_hub, cli
):
    """A two-pass method reads each file twice; each pass is hashed on its own, so a server
    that serves the right bytes in pass 0 and wrong ones in pass 1 is caught (one line)."""
    from test_errors import assert_nothing_written, assert_one_line_error
    from test_method_registry import SignElectedMean, _streamed

    from hfsoup.registry import MergeMethod, register, unregister

    dirs = [save_ingredient(tmp_path / f"ing{i}", tiny_bert_config(), seed=95 + i)
            for i in range(2)]  # fmt: skip
    repos = [publish(d)[0] for d in dirs]
    path = rf"/{repos[1]}/resolve/[^/]+/model\.safetensors$"
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 300)  # the last read is rows inside the file
    register(MergeMethod("toy-signs-check", "two passes", run=_streamed(SignElectedMean)))
    try:
        seen = faulty_hub.add_fault(path=path, times=None)
        args = ("soup", *repos, "--method", "toy-signs-check", "-q", "--output")
        assert cli(*args, tmp_path / "clean").returncode == 0
        reads = seen.hits  # its header probe(s), then each chunk's reads in pass 0 and pass 1
        assert reads >= 4
        faulty_hub.faults.clear()
        # The same requests again, the last one (pass 1's read) with one byte flipped.
        faulty_hub.add_fault(path=path, skip=reads - 1, corrupt=True)
        proc = cli(*args, tmp_path / "soup")
    finally:
        unregister("toy-signs-check")
    assert_one_line_error(proc, f"{repos[1]}: model.safetensors: the bytes streamed from the Hub",
                          "do not match its sha256")  # fmt: skip
    assert_nothing_written(tmp_path)
