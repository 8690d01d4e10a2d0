"""`hfsoup hub serve` / LocalHub: writes need a token the server was given, private repos are read
only with one, upload URLs cannot be forged, and a non-loopback --host warns.

These run the real huggingface_hub client against hubs that enforce tokens (the session hub of
conftest lets writes through, so each test here starts its own on a free port)."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from test_errors import assert_one_line_error

from hfsoup.errors import HubServeError
from hfsoup.serve.hubauth import is_loopback, read_tokens_file
from hfsoup.serve.hubserver import LocalHub

reliability = pytest.mark.reliability
TOKEN = "hf_local_team_token"
WRONG = "hf_local_not_the_token"


@pytest.fixture
def locked(tmp_path):
    """A hub that accepts only TOKEN, with one public and one private repo holding files."""
    from huggingface_hub import HfApi

    with LocalHub(tmp_path / "locked", tokens=[TOKEN]) as server:
        owner = HfApi(endpoint=server.url, token=TOKEN)
        for repo, private in (("team/public", False), ("team/private", True)):
            owner.create_repo(repo, private=private)
            owner.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=repo)
        server.errors.clear()
        yield server
        assert server.errors == []


def client(hub, token):
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub.url, token=token)  # token=False: send none


def heads(hub) -> dict[str, str]:
    """Every repo's branch heads and tags, to show that a refused request changed nothing."""
    return {
        str(p.parent.relative_to(hub.store.root)): p.read_text()
        for p in (hub.store.root / "repos").rglob("repo.json")
    }


def http_request(hub, method: str, path: str, body=None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=10)
    data = json.dumps(body).encode() if isinstance(body, dict | list) else body
    conn.request(method, path, body=data, headers=headers or {})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, payload


# Every route that changes something: (method, path, JSON body).
WRITES = {
    "create repo": ("POST", "/api/repos/create", {"name": "new", "organization": "team"}),
    "delete repo": ("DELETE", "/api/repos/delete", {"name": "public", "organization": "team"}),
    "preupload": ("POST", "/api/models/team/public/preupload/main", {"files": []}),
    "commit": ("POST", "/api/models/team/public/commit/main", None),
    "create branch": ("POST", "/api/models/team/public/branch/dev", {}),
    "delete branch": ("DELETE", "/api/models/team/public/branch/main", None),
    "create tag": ("POST", "/api/models/team/public/tag/main", {"tag": "v1"}),
    "lfs batch": (
        "POST",
        "/team/public.git/info/lfs/objects/batch",
        {"operation": "upload", "objects": [{"oid": "a" * 64, "size": 1}]},
    ),
}
COMMIT = b'{"key": "header", "value": {"summary": "x"}}\n{"key": "deletedFile", "value": {"path": "config.json"}}\n'


@reliability(
    "Write to `hfsoup hub serve` (create/delete repo, preupload, LFS batch, commit, branch, tag) "
    "with no token or a token the server was not given",
    "401 'Invalid credentials in Authorization header' (the client raises HfHubHTTPError; hfsoup "
    "push says access denied); nothing changes on the server",
)
@pytest.mark.parametrize("credentials", ["none", "wrong", "not bearer"])
@pytest.mark.parametrize("route", sorted(WRITES))
def test_a_write_without_a_valid_token_is_refused(locked, route, credentials):
    method, path, body = WRITES[route]
    if route == "commit":
        body = COMMIT
    headers = {
        "none": {},
        "wrong": {"Authorization": f"Bearer {WRONG}"},
        "not bearer": {"Authorization": TOKEN},
    }[credentials]
    before = heads(locked)
    status, payload = http_request(locked, method, path, body, headers)
    assert status == 401, payload
    assert heads(locked) == before


def test_every_write_route_is_guarded(locked):
    """The list above is every route that changes something (a new route must join it)."""
    from hfsoup.serve.handler import ROUTES

    mutating = {name for methods, _, name in ROUTES if set(methods) & {"POST", "PUT", "DELETE"}}
    read_only = {"validate_yaml", "paths_info", "no_such_repo"}  # POST, but change nothing
    signed = {"lfs_put"}  # presigned: tested below
    guarded = {"create_repo", "delete_repo", "preupload", "commit", "branch", "tag", "lfs_batch"}
    assert mutating - read_only - signed == guarded


@reliability(
    "create_repo / upload_file with the real client and no token, or a wrong one",
    "the client raises HfHubHTTPError 401; the repo is neither created nor changed",
)
@pytest.mark.parametrize("token", [False, WRONG])
def test_the_real_client_cannot_write_without_the_token(locked, token):
    from huggingface_hub.errors import HfHubHTTPError

    api = client(locked, token)
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("team/sneaky")
    assert err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_file(path_or_fileobj=b"x" * 100, path_in_repo="w.bin", repo_id="team/public")
    assert err.value.response.status_code == 401
    owner = client(locked, TOKEN)
    assert not owner.repo_exists("team/sneaky")
    assert owner.list_repo_files("team/public") == [".gitattributes", "config.json"]


def test_the_right_token_writes_and_reads_back(locked, tmp_path):
    api = client(locked, TOKEN)
    weights = os.urandom(4096)  # an LFS file: goes through batch + the presigned PUT
    api.create_repo("team/made")
    api.upload_file(path_or_fileobj=weights, path_in_repo="model.safetensors", repo_id="team/made")
    api.create_branch("team/made", branch="dev")
    api.create_tag("team/made", tag="v1")
    path = api.hf_hub_download("team/made", "model.safetensors", cache_dir=tmp_path / "c")
    assert Path(path).read_bytes() == weights
    refs = api.list_repo_refs("team/made")
    assert {b.name for b in refs.branches} == {"main", "dev"} and [t.name for t in refs.tags] == [
        "v1"
    ]
    api.delete_repo("team/made")
    assert not api.repo_exists("team/made")


def _upload_url(hub, oid: str, size: int) -> str:
    body = {"operation": "upload", "objects": [{"oid": oid, "size": size}]}
    status, payload = http_request(
        hub, "POST", "/team/public.git/info/lfs/objects/batch", body,
        {"Authorization": f"Bearer {TOKEN}"},
    )  # fmt: skip
    assert status == 200, payload
    href = urlsplit(json.loads(payload)["objects"][0]["actions"]["upload"]["href"])
    return f"{href.path}?{href.query}"


@reliability(
    "LFS upload PUT (presigned, sent without a token) to a URL the server did not hand out: "
    "unsigned, forged, for another object, another repo or another size",
    "403 (400 for a wrong size); no blob is stored",
)
@pytest.mark.parametrize("forgery", ["unsigned", "tampered", "other oid", "other repo", "bigger"])
def test_an_upload_url_cannot_be_forged(locked, forgery):
    data = b"payload the attacker wants stored"
    oid = hashlib.sha256(data).hexdigest()
    decoy = hashlib.sha256(b"what the batch was asked for").hexdigest()
    if forgery == "unsigned":
        url = f"/team/public.git/info/lfs/objects/{oid}"
    elif forgery == "tampered":
        url = _upload_url(locked, oid, len(data))
        url = url[:-1] + ("0" if url[-1] != "0" else "1")
    elif forgery == "other oid":
        url = _upload_url(locked, decoy, len(data)).replace(decoy, oid)
    elif forgery == "other repo":
        url = _upload_url(locked, oid, len(data)).replace("/team/public.", "/team/private.")
    else:
        url = _upload_url(locked, oid, 4)
    status, payload = http_request(locked, "PUT", url, data)
    assert status == (400 if forgery == "bigger" else 403), payload
    assert not locked.store.has_blob(oid)


def test_a_signed_upload_url_stores_its_blob(locked):
    data = b"the bytes the batch was asked for"
    oid = hashlib.sha256(data).hexdigest()
    status, payload = http_request(locked, "PUT", _upload_url(locked, oid, len(data)), data)
    assert status == 200, payload
    assert locked.store.has_blob(oid)


def _private_reads(api, tmp_path):
    """Every read the real clients make of a repo, as thunks."""
    from huggingface_hub import hf_hub_download

    repo = "team/private"
    return {
        "model_info": lambda: api.model_info(repo),
        "model_info@rev": lambda: api.model_info(repo, revision="main"),
        "tree": lambda: api.list_repo_files(repo),
        "paths-info": lambda: api.get_paths_info(repo, ["config.json"]),
        "refs": lambda: api.list_repo_refs(repo),
        "commits": lambda: api.list_repo_commits(repo),
        "resolve": lambda: hf_hub_download(
            repo, "config.json", endpoint=api.endpoint, token=api.token, cache_dir=tmp_path / "c"
        ),
    }


READS = ["model_info", "model_info@rev", "tree", "paths-info", "refs", "commits", "resolve"]


@reliability(
    "Read of a private repo on `hfsoup hub serve` (info, tree, paths-info, refs, commits, "
    "download) with no token or with a bearer token the server was not given",
    "401 RepoNotFound: the client raises RepositoryNotFoundError and hfsoup says 'repository "
    "not found (or private: set HF_TOKEN ...)'",
)
@pytest.mark.parametrize("token", [False, WRONG])
@pytest.mark.parametrize("read", READS)
def test_a_private_repo_is_not_read_without_a_valid_token(locked, tmp_path, read, token):
    from huggingface_hub.errors import RepositoryNotFoundError

    with pytest.raises(RepositoryNotFoundError) as err:
        _private_reads(client(locked, token), tmp_path)[read]()
    assert err.value.response.status_code == 401


@pytest.mark.parametrize("read", READS)
def test_a_private_repo_is_read_with_the_token(locked, tmp_path, read):
    assert _private_reads(client(locked, TOKEN), tmp_path)[read]() is not None


@reliability(
    "`hfsoup push` / `hfsoup inspect` against a local Hub that enforces tokens, with no "
    "HF_TOKEN or a wrong one",
    "one line: 'push to <repo> failed (access denied; set HF_TOKEN ...)' (PushError) / "
    "'<repo>: repository not found (or private: set HF_TOKEN ...)'; with the token both work",
)
def test_hfsoup_needs_the_token_of_a_locked_hub(locked, tmp_path):
    from conftest import run_cli
    from factories import save_ingredient, tiny_bert_config

    folder = save_ingredient(tmp_path / "soup", tiny_bert_config(), seed=3)
    env = {"HF_ENDPOINT": locked.url, "HF_HOME": str(tmp_path / "home")}

    def hfsoup(*args, token):
        return run_cli(*args, env={**env, "HF_TOKEN": token})

    denied = hfsoup("push", folder, "team/soup", "--private", token="")
    assert_one_line_error(denied, "push to team/soup failed", "access denied")
    assert not client(locked, TOKEN).repo_exists("team/soup")
    pushed = hfsoup("push", folder, "team/soup", "--private", token=TOKEN)
    assert pushed.returncode == 0, pushed.stderr
    hidden = hfsoup("inspect", "team/soup", token=WRONG)
    assert_one_line_error(hidden, "team/soup", "repository not found", "HF_TOKEN")
    read = hfsoup("inspect", "team/soup", token=TOKEN)
    assert read.returncode == 0 and "compatible: yes" in read.stdout, read.stderr


def test_public_repos_are_read_without_a_token(locked):
    assert client(locked, False).list_repo_files("team/public") == [".gitattributes", "config.json"]


@reliability(
    "whoami on the local Hub with a wrong token",
    "401 'Invalid credentials in Authorization header' (the client raises HfHubHTTPError)",
)
def test_whoami_checks_the_token(locked):
    from huggingface_hub.errors import HfHubHTTPError

    assert client(locked, TOKEN).whoami()["name"] == "hfsoup-user"
    with pytest.raises(HfHubHTTPError) as err:
        client(locked, WRONG).whoami()
    assert err.value.response.status_code == 401


def test_a_tokens_file_gives_one_token_a_line(tmp_path):
    from huggingface_hub import HfApi

    path = tmp_path / "tokens.txt"
    path.write_text("# the team\nhf_local_alice\n\n  hf_local_bob  # not a comment: one token\n")
    with pytest.raises(HubServeError, match="line 4 .* holds spaces"):  # refused, not cut
        read_tokens_file(path)
    path.write_text("# the team\nhf_local_alice\n\n  hf_local_bob  \n")
    assert read_tokens_file(path) == ["hf_local_alice", "hf_local_bob"]
    with LocalHub(tmp_path / "hub", tokens=read_tokens_file(path)) as hub:
        for token in ("hf_local_alice", "hf_local_bob"):
            HfApi(endpoint=hub.url, token=token).create_repo(f"team/{token[9:]}")
        assert hub.token == "hf_local_alice"


@reliability(
    "`hfsoup hub serve` with a tokens file that is missing, not UTF-8, holds no token or a "
    "malformed one, or an empty --token",
    "one line: 'hfsoup: error: cannot read the tokens file ...' / '... holds no token' / "
    "'... holds spaces, control or non-ASCII characters' / 'a --token value is empty' "
    "(HubServeError); the token itself is never quoted",
)
@pytest.mark.parametrize(
    "content, message",
    [
        (None, "cannot read the tokens file"),
        (b"\xff\xfe\x00", "not UTF-8"),
        (b"# only comments\n\n", "holds no token"),
        (b"hf_local_\xc3\xa9t\xc3\xa9\n", "non-ASCII"),
        ("--token=", "is empty"),
    ],
)
def test_bad_tokens_are_one_line_errors(tmp_path, cli, content, message):
    data = ["--data", tmp_path / "hub", "--port", "0"]
    if isinstance(content, str):
        proc = cli("hub", "serve", *data, content)
    else:
        path = tmp_path / "tokens.txt"
        if content is not None:
            path.write_bytes(content)
        proc = cli("hub", "serve", *data, "--tokens-file", path)
    assert_one_line_error(proc, message)
    assert "\xe9t" not in proc.stderr and proc.stdout == ""


@reliability(
    "`hfsoup hub serve` on a port already in use",
    "one line: 'hfsoup: error: cannot serve on 127.0.0.1:PORT: Address already in use' "
    "(HubServeError)",
)
def test_a_port_in_use_is_a_one_line_error(hub, tmp_path, cli):
    proc = cli("hub", "serve", "--data", tmp_path / "hub", "--port", hub.port, "--token", TOKEN)
    assert_one_line_error(proc, f"cannot serve on 127.0.0.1:{hub.port}")


@pytest.mark.parametrize(
    "host, loopback",
    [("127.0.0.1", True), ("127.8.9.10", True), ("localhost", True), ("::1", True),
     ("[::1]", True), ("0.0.0.0", False), ("::", False), ("", False), ("192.168.1.20", False),
     ("10.0.0.1", False), ("example.org", False), ("127.0.0.1.example.org", False)],
)  # fmt: skip
def test_loopback_hosts_are_told_apart(host, loopback):
    assert is_loopback(host) is loopback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The two command lines of the server: the hfsoup CLI, and the server module on its own.
HUB_SERVE = ("hfsoup", "hub", "serve")
SERVER_MODULE = ("hfsoup.serve.hubserver",)


class Served:
    """``python -m hfsoup hub serve --port P OPTIONS`` in a subprocess, its output in files."""

    def __init__(self, tmp_path, *options: str, entry: tuple[str, ...] = HUB_SERVE) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"  # only ever connect through loopback
        self.out, self.err = tmp_path / "serve.out", tmp_path / "serve.err"
        cmd = [sys.executable, "-m", *entry, "--data", str(tmp_path / "served"),
               "--port", str(self.port), *options]  # fmt: skip
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err)

    def __enter__(self) -> Served:
        # The 'Serving ...' line comes after the socket is bound and after the notices.
        deadline = time.monotonic() + 60
        while "Serving " not in self.out.read_text() and time.monotonic() < deadline:
            assert self.proc.poll() is None, self.err.read_text()
            time.sleep(0.1)
        assert "Serving " in self.out.read_text(), self.err.read_text()
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    @property
    def stderr(self) -> str:
        return self.err.read_text()


@reliability(
    "`hfsoup hub serve --host 0.0.0.0` (any address but loopback)",
    "a warning on stderr: 'hfsoup hub: warning: serving on '0.0.0.0', not a loopback address: "
    "... no TLS, so tokens and files travel in clear text ...'; it still serves",
)
def test_a_non_loopback_host_prints_a_warning(tmp_path):
    from huggingface_hub import HfApi

    with Served(tmp_path, "--host", "0.0.0.0", "--token", TOKEN) as served:
        HfApi(endpoint=served.url, token=TOKEN).create_repo("team/x")  # it still serves
    err = served.stderr
    warning = [line for line in err.splitlines() if "not a loopback address" in line]
    assert len(warning) == 1, err
    assert "0.0.0.0" in warning[0] and "clear text" in warning[0]
    assert TOKEN not in err  # a given token is never echoed


def test_a_loopback_host_prints_no_warning(tmp_path):
    with Served(tmp_path, "--token", TOKEN) as served:
        pass
    assert "warning" not in served.stderr and TOKEN not in served.stderr


@reliability(
    "`hfsoup hub serve` with neither --token nor --tokens-file",
    "one stderr line with a random token made for this run: 'hfsoup hub: no token was given, "
    "... export HF_TOKEN=hf_local_...'; only that token writes",
)
def test_serve_without_a_token_prints_the_generated_one(tmp_path):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    with Served(tmp_path) as served:
        lines = [line for line in served.stderr.splitlines() if "export HF_TOKEN=" in line]
        assert len(lines) == 1, served.stderr
        token = lines[0].split("export HF_TOKEN=")[1].strip()
        assert token.startswith("hf_local_") and len(token) > 30
        with pytest.raises(HfHubHTTPError):
            HfApi(endpoint=served.url, token=False).create_repo("team/anonymous")
        HfApi(endpoint=served.url, token=token).create_repo("team/with-token")
    assert served.stderr.count(token) == 1  # shown once, never again
    assert token not in served.out.read_text()


def test_each_hub_makes_its_own_token_when_given_none(tmp_path):
    from huggingface_hub import HfApi

    with LocalHub(tmp_path / "a") as a, LocalHub(tmp_path / "b") as b:
        assert a.token and b.token and a.token != b.token
        HfApi(endpoint=a.url, token=a.token).create_repo("team/a")
        from huggingface_hub.errors import HfHubHTTPError

        with pytest.raises(HfHubHTTPError):
            HfApi(endpoint=b.url, token=a.token).create_repo("team/b")


def test_the_server_module_serves_on_its_own(tmp_path):
    """``python -m hfsoup.serve.hubserver`` (what the benchmarks start) serves like the CLI."""
    from huggingface_hub import HfApi

    with Served(tmp_path, "--token", TOKEN, entry=SERVER_MODULE) as served:
        HfApi(endpoint=served.url, token=TOKEN).create_repo("team/alone")
        info = HfApi(endpoint=served.url, token=TOKEN).model_info("team/alone")
    assert info.id == "team/alone"
    assert served.proc.returncode == 0, served.stderr  # SIGTERM stops it as Ctrl-C does
    assert f"at {served.url}" in served.out.read_text()
    assert TOKEN not in served.stderr


def test_the_server_module_imports_nothing_of_hfsoup_but_the_server():
    """No import of hfsoup.cli (which imports the server: a cycle) nor of the soup machinery."""
    code = (
        "import sys, hfsoup.serve.hubserver; "
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('hfsoup'))))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    modules = proc.stdout.split()
    assert "hfsoup.serve.hubserver" in modules
    assert [m for m in modules if m not in ("hfsoup", "hfsoup._version", "hfsoup.errors", "hfsoup.serve")
            and not m.startswith("hfsoup.serve.")] == []  # fmt: skip


def test_the_server_module_takes_the_options_of_hub_serve():
    import argparse

    from hfsoup.cli import build_parser
    from hfsoup.serve.hubserver import _parser

    def options(parser: argparse.ArgumentParser) -> dict[str, tuple]:
        return {
            a.option_strings[0]: (a.dest, a.default, a.type, a.required, type(a).__name__)
            for a in parser._actions
            if a.option_strings and a.dest not in ("help", "debug", "quiet", "json")
        }

    def subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
        (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return sub.choices[name]

    hub_serve = subparser(subparser(build_parser(), "hub"), "serve")
    assert options(_parser()) == options(hub_serve)
    assert set(options(hub_serve)) == {"--data", "--host", "--port", "--token", "--tokens-file"}


def test_the_server_module_says_a_bad_token_in_one_line(tmp_path):
    cmd = [sys.executable, "-m", *SERVER_MODULE, "--data", str(tmp_path / "hub"), "--token=",
           "--port", "0"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert_one_line_error(proc, "a --token value is empty")
    assert proc.stdout == ""
