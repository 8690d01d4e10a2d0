"""The test Hub answers the real clients: huggingface_hub, transformers, datasets, evaluate."""

from __future__ import annotations

import hashlib
import http.client
import json
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from factories import make_model, save_ingredient, tiny_bert_config

from hfsoup.serve.hubserver import LocalHub


@pytest.fixture(autouse=True)
def _no_server_errors(hub):
    """Every test also checks that no request crashed the server."""
    yield
    assert hub.errors == []


def _folder(path: Path, files: dict[str, bytes | str]) -> Path:
    for name, content in files.items():
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def _url(hub: LocalHub, repo_id: str, filename: str, revision: str = "main") -> str:
    from huggingface_hub import hf_hub_url

    return hf_hub_url(repo_id, filename, revision=revision, endpoint=hub.url)


# -- repos and commits ---------------------------------------------------------------------------
def test_create_repo_conflicts_unless_exist_ok(api, repo_id):
    from huggingface_hub.errors import HfHubHTTPError

    rid = repo_id()
    url = api.create_repo(rid)
    assert url.repo_id == rid
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(rid)
    assert err.value.response.status_code == 409
    assert api.create_repo(rid, exist_ok=True).repo_id == rid


def test_upload_folder_makes_one_commit(api, repo_id, tmp_path):
    rid = repo_id()
    api.create_repo(rid)
    before = len(api.list_repo_commits(rid))
    files = {"config.json": "{}", "model.safetensors": b"\0" * 100, "sub/notes.txt": "hi"}
    info = api.upload_folder(repo_id=rid, folder_path=_folder(tmp_path, files))
    assert len(api.list_repo_commits(rid)) == before + 1
    assert api.list_repo_commits(rid)[0].commit_id == info.oid
    assert set(files) <= set(api.list_repo_files(rid))


def test_download_at_pinned_commit_returns_old_content(api, repo_id):
    from huggingface_hub import hf_hub_download

    rid = repo_id()
    api.create_repo(rid)
    old = api.upload_file(path_or_fileobj=b"version 1", path_in_repo="a.txt", repo_id=rid).oid
    api.upload_file(path_or_fileobj=b"version 2", path_in_repo="a.txt", repo_id=rid)
    assert Path(hf_hub_download(rid, "a.txt", revision=old)).read_bytes() == b"version 1"
    assert Path(hf_hub_download(rid, "a.txt")).read_bytes() == b"version 2"


def test_model_info_reports_sha_sizes_and_lfs(api, repo_id, tmp_path):
    rid = repo_id()
    api.create_repo(rid)
    weights = bytes(range(256)) * 4
    files = {"config.json": '{"a": 1}', "model.safetensors": weights}
    commit = api.upload_folder(repo_id=rid, folder_path=_folder(tmp_path, files))
    info = api.model_info(rid, files_metadata=True)
    assert info.sha == commit.oid
    siblings = {s.rfilename: s for s in info.siblings}
    assert siblings["config.json"].size == 8 and siblings["config.json"].lfs is None
    lfs = siblings["model.safetensors"].lfs
    assert lfs.sha256 == hashlib.sha256(weights).hexdigest() and lfs.size == len(weights)


def test_list_repo_refs_shows_main_at_head(api, repo_id):
    rid = repo_id()
    api.create_repo(rid)
    head = api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=rid).oid
    refs = api.list_repo_refs(rid)
    assert [(b.name, b.ref, b.target_commit) for b in refs.branches] == [
        ("main", "refs/heads/main", head)
    ]
    assert refs.tags == [] and refs.converts == []


def test_tag_resolves_to_tagged_commit(api, repo_id):
    from huggingface_hub import hf_hub_download

    rid = repo_id()
    api.create_repo(rid)
    tagged = api.upload_file(path_or_fileobj=b"v1", path_in_repo="a.txt", repo_id=rid).oid
    api.create_tag(rid, tag="v1.0", tag_message="first")
    api.upload_file(path_or_fileobj=b"v2", path_in_repo="a.txt", repo_id=rid)
    assert [t.target_commit for t in api.list_repo_refs(rid).tags] == [tagged]
    assert api.model_info(rid, revision="v1.0").sha == tagged
    assert Path(hf_hub_download(rid, "a.txt", revision="v1.0")).read_bytes() == b"v1"


def test_branch_takes_commits_apart_from_main(api, repo_id):
    rid = repo_id()
    api.create_repo(rid)
    main_head = api.upload_file(path_or_fileobj=b"m", path_in_repo="m.txt", repo_id=rid).oid
    api.create_branch(rid, branch="dev")
    api.upload_file(path_or_fileobj=b"d", path_in_repo="d.txt", repo_id=rid, revision="dev")
    assert "d.txt" in api.list_repo_files(rid, revision="dev")
    assert "d.txt" not in api.list_repo_files(rid)
    assert api.model_info(rid).sha == main_head


def test_stale_parent_commit_is_refused(api, repo_id):
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError

    rid = repo_id()
    api.create_repo(rid)
    parent = api.model_info(rid).sha
    api.upload_file(path_or_fileobj=b"1", path_in_repo="a.txt", repo_id=rid)
    with pytest.raises(HfHubHTTPError) as err:
        api.create_commit(
            rid,
            operations=[CommitOperationAdd("b.txt", b"2")],
            commit_message="late",
            parent_commit=parent,
        )
    assert err.value.response.status_code == 412


def test_delete_repo(api, repo_id):
    rid = repo_id()
    api.create_repo(rid)
    api.delete_repo(rid)
    assert not api.repo_exists(rid)


def test_data_persists_across_restart(tmp_path, repo_id):
    from huggingface_hub import HfApi

    rid = repo_id()
    with LocalHub(tmp_path / "hub") as first:
        api = HfApi(endpoint=first.url, token=first.token)
        api.create_repo(rid, repo_type="dataset")
        sha = api.upload_file(
            path_or_fileobj=b"kept", path_in_repo="a.txt", repo_id=rid, repo_type="dataset"
        ).oid
    with LocalHub(tmp_path / "hub") as second:
        api = HfApi(endpoint=second.url)
        assert api.dataset_info(rid).sha == sha
        path = api.hf_hub_download(rid, "a.txt", repo_type="dataset", cache_dir=tmp_path / "c")
        assert Path(path).read_bytes() == b"kept"


def test_tree_expand_reports_the_commit_that_last_changed_each_path(api, repo_id):
    rid = repo_id()
    api.create_repo(rid)
    first = api.upload_file(path_or_fileobj=b"1", path_in_repo="sub/a.txt", repo_id=rid).oid
    second = api.upload_file(path_or_fileobj=b"2", path_in_repo="b.txt", repo_id=rid).oid
    last = {e.path: e.last_commit.oid for e in api.list_repo_tree(rid, expand=True)}
    assert last["sub"] == first and last["b.txt"] == second


# -- reading bytes -------------------------------------------------------------------------------
def test_range_read_returns_exactly_those_bytes(api, hub, repo_id):
    from huggingface_hub import get_session

    rid = repo_id()
    api.create_repo(rid)
    data = bytes(range(256)) * 8
    api.upload_file(path_or_fileobj=data, path_in_repo="w.safetensors", repo_id=rid)
    url = _url(hub, rid, "w.safetensors")
    r = get_session().get(url, headers={"Range": "bytes=100-299"})
    assert r.status_code == 206
    assert r.content == data[100:300]
    assert r.headers["Content-Range"] == f"bytes 100-299/{len(data)}"
    assert get_session().get(url, headers={"Range": "bytes=2000-"}).content == data[2000:]


def test_range_past_the_end_is_unsatisfiable(api, hub, repo_id):
    from huggingface_hub import get_session

    rid = repo_id()
    api.create_repo(rid)
    api.upload_file(path_or_fileobj=b"0123456789", path_in_repo="a.bin", repo_id=rid)
    r = get_session().get(_url(hub, rid, "a.bin"), headers={"Range": "bytes=10-"})
    assert r.status_code == 416 and r.headers["Content-Range"] == "bytes */10"


def test_head_reports_commit_etag_and_size(api, hub, repo_id):
    from huggingface_hub import get_hf_file_metadata

    rid = repo_id()
    api.create_repo(rid)
    weights = b"\1" * 1000
    sha = api.upload_file(path_or_fileobj=weights, path_in_repo="m.safetensors", repo_id=rid).oid
    meta = get_hf_file_metadata(_url(hub, rid, "m.safetensors"))
    assert (meta.commit_hash, meta.etag, meta.size) == (
        sha,
        hashlib.sha256(weights).hexdigest(),
        1000,
    )


def _sharded_checkpoint(api, rid: str, tmp_path: Path) -> tuple[str, dict]:
    """Upload a tiny BERT saved in several shards; return the commit and the index."""
    api.create_repo(rid)
    folder = save_ingredient(tmp_path / "m", tiny_bert_config(), seed=1, max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    return api.upload_folder(repo_id=rid, folder_path=folder).oid, index


def test_get_safetensors_metadata_of_sharded_checkpoint(api, repo_id, tmp_path):
    rid = repo_id()
    sha, index = _sharded_checkpoint(api, rid, tmp_path)
    meta = api.get_safetensors_metadata(rid, revision=sha)
    assert meta.sharded and meta.weight_map == index["weight_map"]
    assert set(meta.files_metadata) == set(index["weight_map"].values())


def test_sharded_safetensors_metadata_in_one_request(faulty_hub, api, repo_id, tmp_path):
    rid = repo_id()
    sha, index = _sharded_checkpoint(api, rid, tmp_path)
    # A pass-through rule only counts the requests that name this repo.
    seen = faulty_hub.add_fault(path=re.escape(rid), times=None)
    one_request = api.get_sharded_safetensors_metadata(rid)
    assert seen.hits == 1
    assert one_request == api.get_safetensors_metadata(rid, revision=sha)
    # ...where reading the index and then every shard's header takes a request per file.
    assert seen.hits - 1 > len(set(index["weight_map"].values()))


# -- the other clients ---------------------------------------------------------------------------
def test_transformers_push_to_hub_and_from_pretrained_round_trip(repo_id):
    import torch
    from transformers import AutoModelForSequenceClassification

    rid = repo_id("bert")
    model = make_model(tiny_bert_config(), seed=3)
    model.push_to_hub(rid)
    loaded = AutoModelForSequenceClassification.from_pretrained(rid)
    assert loaded.config.id2label == model.config.id2label
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)


def test_load_dataset_reads_parquet_splits(api, repo_id, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rid = repo_id("data")
    api.create_repo(rid, repo_type="dataset")
    splits = {"train": ["good", "bad", "fine"], "validation": ["meh"]}
    for split, texts in splits.items():
        path = tmp_path / "data" / f"{split}-00000-of-00001.parquet"
        path.parent.mkdir(exist_ok=True)
        table = pa.table({"text": texts, "label": [i % 2 for i in range(len(texts))]})
        pq.write_table(table, path)
    api.upload_folder(repo_id=rid, repo_type="dataset", folder_path=tmp_path)
    ds = datasets.load_dataset(rid, cache_dir=str(tmp_path / "cache"))
    assert {name: ds[name]["text"] for name in ds} == splits


ACCURACY_PY = """
import datasets
import evaluate


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="accuracy",
            citation="",
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(self, predictions, references):
        hits = sum(int(p == r) for p, r in zip(predictions, references))
        return {"accuracy": hits / len(references)}
"""


def test_evaluate_load_runs_metric_from_space(api, tmp_path, monkeypatch):
    import evaluate

    # evaluate.load("accuracy") would prefer ./accuracy/accuracy.py: work from an empty folder.
    monkeypatch.chdir(tmp_path)
    rid = "evaluate-metric/accuracy"
    api.create_repo(rid, repo_type="space", space_sdk="static", exist_ok=True)
    api.upload_file(
        path_or_fileobj=ACCURACY_PY.encode(),
        path_in_repo="accuracy.py",
        repo_id=rid,
        repo_type="space",
    )
    metric = evaluate.load("accuracy")
    assert metric.compute(predictions=[1, 0, 1, 1], references=[1, 1, 1, 0]) == {"accuracy": 0.5}


# -- errors --------------------------------------------------------------------------------------
def test_missing_repo_raises_repository_not_found(api):
    from huggingface_hub.errors import RepositoryNotFoundError

    with pytest.raises(RepositoryNotFoundError):
        api.model_info("test-org/does-not-exist")


def test_missing_revision_raises_revision_not_found(api, repo_id):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RevisionNotFoundError

    rid = repo_id()
    api.create_repo(rid)
    with pytest.raises(RevisionNotFoundError):
        api.model_info(rid, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(rid, ".gitattributes", revision="f" * 40)


def test_missing_file_raises_entry_not_found(api, repo_id):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    rid = repo_id()
    api.create_repo(rid)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(rid, "missing.json")
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(rid, path_in_repo="additional_chat_templates"))


def test_private_repo_needs_a_token(api, repo_id):
    from huggingface_hub.errors import RepositoryNotFoundError

    rid = repo_id()
    api.create_repo(rid, private=True, token="hf_test")
    with pytest.raises(RepositoryNotFoundError) as err:
        api.model_info(rid)
    assert err.value.response.status_code == 401
    assert api.model_info(rid, token="hf_test").private is True


def signed_upload_url(hub, rid: str, oid: str, size: int, headers: dict | None = None) -> str:
    """The presigned upload URL (path and query) an LFS batch call hands out for one object."""
    body = json.dumps({"operation": "upload", "objects": [{"oid": oid, "size": size}]})
    conn = http.client.HTTPConnection(hub.host, hub.port, timeout=10)
    conn.request("POST", f"/{rid}.git/info/lfs/objects/batch", body=body, headers=headers or {})
    href = json.loads(conn.getresponse().read())["objects"][0]["actions"]["upload"]["href"]
    conn.close()
    parts = urlsplit(href)
    return f"{parts.path}?{parts.query}"


def test_lfs_upload_with_wrong_bytes_is_rejected(api, hub, repo_id):
    rid = repo_id()
    api.create_repo(rid)
    oid = hashlib.sha256(b"expected").hexdigest()
    url = signed_upload_url(hub, rid, oid, len(b"something else"))
    conn = http.client.HTTPConnection(hub.host, hub.port, timeout=10)
    conn.request("PUT", url, body=b"something else")
    assert conn.getresponse().status == 400
    conn.close()


def test_lfs_upload_accepts_chunked_body(api, hub, repo_id):
    rid = repo_id()
    api.create_repo(rid)
    data = b"streamed" * 1000
    oid = hashlib.sha256(data).hexdigest()
    url = signed_upload_url(hub, rid, oid, len(data))
    conn = http.client.HTTPConnection(hub.host, hub.port, timeout=10)
    chunks = (data[i : i + 3000] for i in range(0, len(data), 3000))
    conn.request("PUT", url, body=chunks, encode_chunked=True)
    response = conn.getresponse()
    response.read()
    assert response.status == 200
    assert hub.store.has_blob(oid)
    conn.close()


# -- faults --------------------------------------------------------------------------------------
def test_status_fault_answers_then_clears(api, hub, repo_id):
    rid = repo_id()
    api.create_repo(rid)
    # preupload goes through the client's backoff: one 500, then the retry succeeds.
    fault = hub.add_fault(method="POST", path=r"/preupload/", status=500, times=1)
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=rid)
    assert fault.hits == 1 and fault.times == 0
    assert "x.txt" in api.list_repo_files(rid)


def test_dropped_download_resumes_with_a_range_request(api, hub, repo_id):
    from huggingface_hub import hf_hub_download

    rid = repo_id()
    api.create_repo(rid)
    data = bytes(range(256)) * 40
    api.upload_file(path_or_fileobj=data, path_in_repo="w.safetensors", repo_id=rid)
    fault = hub.add_fault(method="GET", path=r"/resolve/.*w\.safetensors$", drop_after_bytes=1000)
    assert Path(hf_hub_download(rid, "w.safetensors")).read_bytes() == data
    assert fault.hits == 1
