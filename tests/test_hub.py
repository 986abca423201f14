"""Tests for aufold.hub against a local server that emulates the Hugging Face Hub.

huggingface_hub reads HF_ENDPOINT when it is imported, so every push runs in a fresh
Python subprocess pointed at the fake hub; the fake hub records every request it gets.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from safetensors.numpy import save_file
from tiny_models import save_tiny_model

from aufold.pairs import ContrastivePair, write_pairs
from aufold.safety.outputs import MARKER

REPO_ROOT = Path(__file__).resolve().parents[1]
FAKE_TOKEN = "hf_aufoldFakeToken0123456789abcdefXYZ"
REPO_ID = "someone/edited-model"
BASE_ID = "someone/tiny-base"  # the base a pushed card names (a local model has no hub id)
COMMIT_OID = "0123456789abcdef0123456789abcdef01234567"
COMMIT_MESSAGE = "Push from the aufold test"

PUSH_SCRIPT = """
import sys
from aufold.errors import AufoldError
from aufold.hub import push_folder_to_hub
try:
    print(push_folder_to_hub(sys.argv[1], sys.argv[2], private=True, commit_message=sys.argv[3]))
except AufoldError as err:
    print(f"AufoldError: {err}")
    sys.exit(2)
"""


@dataclass(frozen=True)
class Call:
    """One request that the fake hub received."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class FakeHub(ThreadingHTTPServer):
    """The Hub endpoints that create_repo and upload_folder use, without xet or LFS."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _FakeHubHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.calls: list[Call] = []
        self.reject_with: int | None = None  # set to an HTTP status to refuse every request


class _FakeHubHandler(BaseHTTPRequestHandler):
    server: FakeHub

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def log_message(self, format: str, *args: object) -> None:
        """Keep the test output clean."""

    def _handle(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        path = urlsplit(self.path).path
        headers = {key.lower(): value for key, value in self.headers.items()}
        self.server.calls.append(Call(self.command, path, headers, body))
        status, answer = self._answer(path, body)
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _answer(self, path: str, body: bytes) -> tuple[int, object]:
        hub = self.server
        if hub.reject_with is not None:
            return hub.reject_with, {"error": "Invalid credentials in Authorization header"}
        route = (self.command, path)
        if route == ("POST", "/api/repos/create"):
            return 200, {"url": f"{hub.url}/{REPO_ID}"}
        if route == ("POST", "/api/validate-yaml"):
            return 200, {"errors": [], "warnings": []}
        if route == ("POST", f"/api/models/{REPO_ID}/preupload/main"):
            # "regular" puts each file's content inline in the commit: no LFS or xet transfer.
            files = [
                {"path": file["path"], "uploadMode": "regular", "shouldIgnore": False}
                for file in json.loads(body)["files"]
            ]
            return 200, {"files": files}
        if route == ("POST", f"/api/models/{REPO_ID}/commit/main"):
            commit_url = f"{hub.url}/{REPO_ID}/commit/{COMMIT_OID}"
            return 200, {"commitUrl": commit_url, "commitOid": COMMIT_OID}
        return 404, {"error": f"{self.command} {path} is not emulated"}


@pytest.fixture
def fake_hub() -> Iterator[FakeHub]:
    hub = FakeHub()
    thread = threading.Thread(target=hub.serve_forever, daemon=True)
    thread.start()
    yield hub
    hub.shutdown()
    hub.server_close()
    thread.join()


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "edited"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    weights = {"weight": np.arange(16, dtype=np.float32).reshape(4, 4)}
    save_file(weights, str(folder / "model.safetensors"))
    (folder / "README.md").write_text("---\nlibrary_name: transformers\n---\n# Edited model\n")
    return folder


def hub_env(endpoint: str, hf_home: Path) -> dict[str, str]:
    """An environment that only knows the fake hub and the fake token."""
    # Drop the caller's HF_* settings (offline mode, OIDC, a real token or login) and proxies.
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("HF_", "HUGGING_FACE_")) and "proxy" not in key.lower()
    }
    # HF_HUB_DISABLE_XET makes upload_folder take the plain preupload + commit path.
    env.update(
        HF_ENDPOINT=endpoint, HF_TOKEN=FAKE_TOKEN, HF_HUB_DISABLE_XET="1", HF_HOME=str(hf_home)
    )
    return env


def run_push(endpoint: str, folder: Path, hf_home: Path) -> subprocess.CompletedProcess[str]:
    """Push ``folder`` from a fresh interpreter (huggingface_hub reads HF_ENDPOINT on import)."""
    return subprocess.run(
        [sys.executable, "-c", PUSH_SCRIPT, str(folder), REPO_ID, COMMIT_MESSAGE],
        cwd=REPO_ROOT,
        env=hub_env(endpoint, hf_home),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_push_creates_the_repo_and_commits_every_file(
    fake_hub: FakeHub, model_folder: Path, tmp_path: Path
) -> None:
    result = run_push(fake_hub.url, model_folder, tmp_path / "hf_home")

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{fake_hub.url}/{REPO_ID}/commit/{COMMIT_OID}"
    assert FAKE_TOKEN not in result.stdout + result.stderr

    creates = [call for call in fake_hub.calls if call.path == "/api/repos/create"]
    assert len(creates) == 1
    created = json.loads(creates[0].body)
    assert created["organization"] == "someone" and created["name"] == "edited-model"
    assert created["visibility"] == "private"

    commits = [call for call in fake_hub.calls if call.path == f"/api/models/{REPO_ID}/commit/main"]
    assert len(commits) == 1
    header, *entries = [json.loads(line) for line in commits[0].body.splitlines()]
    assert header == {"key": "header", "value": {"summary": COMMIT_MESSAGE, "description": ""}}
    assert {entry["key"] for entry in entries} == {"file"}
    uploaded = {
        entry["value"]["path"]: base64.b64decode(entry["value"]["content"]) for entry in entries
    }
    assert uploaded == {path.name: path.read_bytes() for path in model_folder.iterdir()}

    # Every request of the push is a POST; huggingface_hub may also GET public data without a token.
    pushes = [call for call in fake_hub.calls if call.method == "POST"]
    assert all(call.headers.get("authorization") == f"Bearer {FAKE_TOKEN}" for call in pushes)


def test_refused_credentials_become_a_clear_aufold_error(
    fake_hub: FakeHub, model_folder: Path, tmp_path: Path
) -> None:
    fake_hub.reject_with = 401

    result = run_push(fake_hub.url, model_folder, tmp_path / "hf_home")

    assert result.returncode == 2, result.stderr
    message = result.stdout.strip()
    assert message.startswith("AufoldError: ") and "\n" not in message
    assert "HTTP 401" in message and "hf auth login" in message and "HF_TOKEN" in message
    assert FAKE_TOKEN not in result.stdout + result.stderr
    assert not any("/commit/" in call.path for call in fake_hub.calls)


def test_unreachable_hub_becomes_a_clear_aufold_error(model_folder: Path, tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port that was just free, so nothing listens on it
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"

    result = run_push(endpoint, model_folder, tmp_path / "hf_home")

    assert result.returncode == 2, result.stderr
    assert result.stdout.startswith(f"AufoldError: cannot reach the Hugging Face Hub at {endpoint}")
    assert FAKE_TOKEN not in result.stdout + result.stderr


def test_export_push_to_hub_uploads_the_exported_folder(fake_hub: FakeHub, tmp_path: Path) -> None:
    base = save_tiny_model("llama", tmp_path / "base")
    write_pairs([ContrastivePair(f"{a} and", f" {a}", f" {a + 1}") for a in range(5)], tmp_path / "p.jsonl")
    aufold = [sys.executable, "-c", "import cli; cli.main()"]
    env = hub_env(fake_hub.url, tmp_path / "hf_home")
    subprocess.run([*aufold, "localize", str(base), "--pairs", str(tmp_path / "p.jsonl"), "--site", "mlp",
                    "--out", str(tmp_path / "plan")], cwd=REPO_ROOT, env=env, check=True, timeout=120)
    out = tmp_path / "folded"
    result = subprocess.run([*aufold, "export", str(base), "--plan", str(tmp_path / "plan"), "--k", "3",
                             "--alpha", "2", "--out", str(out), "--push-to-hub", REPO_ID, "--private",
                             "--base-model-id", BASE_ID],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"pushed to {fake_hub.url}/{REPO_ID}/commit/{COMMIT_OID}" in result.stdout
    assert FAKE_TOKEN not in result.stdout + result.stderr
    created = [json.loads(c.body) for c in fake_hub.calls if c.path == "/api/repos/create"]
    assert created and created[0]["visibility"] == "private"
    commits = [call for call in fake_hub.calls if call.path == f"/api/models/{REPO_ID}/commit/main"]
    assert len(commits) == 1
    uploaded = {entry["value"]["path"]: base64.b64decode(entry["value"]["content"])
                for entry in map(json.loads, commits[0].body.splitlines()[1:])}
    # Everything but the local marker that lets a later --overwrite recognise the folder.
    assert uploaded == {path.name: path.read_bytes() for path in out.iterdir() if path.name != MARKER}
    assert (out / MARKER).is_file()
    card = uploaded["README.md"].decode()  # its usage lines name the repo it was pushed to
    assert f'from_pretrained("{REPO_ID}")' in card and f'base_model: "{BASE_ID}"' in card


def test_a_push_of_a_local_model_needs_its_hub_id(exportable: tuple[Path, Path],
                                                  tmp_path: Path) -> None:
    base, plan = exportable
    env = hub_env("http://127.0.0.1:9", tmp_path / "hf_home")
    result = subprocess.run([sys.executable, "-c", "import cli; cli.main()", "export", str(base),
                             "--plan", str(plan), "--k", "3", "--alpha", "2", "--out",
                             str(tmp_path / "folded"), "--push-to-hub", REPO_ID], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    assert "--base-model-id" in _one_error_line(result)
    assert not (tmp_path / "folded").exists()


@pytest.fixture
def exportable(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny model and a plan for it, made without the hub."""
    base = save_tiny_model("llama", tmp_path / "base")
    write_pairs([ContrastivePair(f"{a} and", f" {a}", f" {a + 1}") for a in range(5)], tmp_path / "p.jsonl")
    subprocess.run([sys.executable, "-c", "import cli; cli.main()", "localize", str(base), "--pairs",
                    str(tmp_path / "p.jsonl"), "--site", "mlp", "--out", str(tmp_path / "plan")],
                   cwd=REPO_ROOT, check=True, timeout=120, capture_output=True)
    return base, tmp_path / "plan"


def run_export(env: dict[str, str], base: Path, plan: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "import cli; cli.main()", "export", str(base), "--plan",
                           str(plan), "--k", "3", "--alpha", "2", "--base-model-id", BASE_ID, *extra],
                          cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("aufold: error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.mark.parametrize(("repo", "env_change", "message"), [
    ("not a/valid/repo", {}, "invalid repo id"),
    (REPO_ID, {"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
    (REPO_ID, {"HF_TOKEN": ""}, "no Hugging Face token"),
])
def test_a_push_that_cannot_succeed_is_refused_before_any_work(
        exportable: tuple[Path, Path], tmp_path: Path, repo: str, env_change: dict[str, str],
        message: str) -> None:
    base, plan = exportable
    env = hub_env("http://127.0.0.1:9", tmp_path / "hf_home")  # nothing listens there
    env.update(env_change)
    if env_change.get("HF_TOKEN") == "":
        del env["HF_TOKEN"]
    result = run_export(env, base, plan, "--out", str(tmp_path / "folded"), "--push-to-hub", repo)
    assert message in _one_error_line(result)
    assert not (tmp_path / "folded").exists()
    assert FAKE_TOKEN not in result.stdout + result.stderr


def test_a_failed_upload_keeps_the_export_only_when_out_was_given(
        fake_hub: FakeHub, exportable: tuple[Path, Path], tmp_path: Path) -> None:
    base, plan = exportable
    fake_hub.reject_with = 401
    env = hub_env(fake_hub.url, tmp_path / "hf_home")
    kept = run_export(env, base, plan, "--out", str(tmp_path / "folded"), "--push-to-hub", REPO_ID)
    line = _one_error_line(kept)
    assert "HTTP 401" in line and f"the export stays in {tmp_path / 'folded'}" in line
    assert (tmp_path / "folded" / "model.safetensors").is_file()

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env["TMPDIR"] = str(scratch)  # where the export without --out is written and removed
    dropped = run_export(env, base, plan, "--push-to-hub", REPO_ID)
    assert "no local copy was kept" in _one_error_line(dropped)
    assert list(scratch.iterdir()) == []
    assert FAKE_TOKEN not in kept.stderr + dropped.stderr


def test_export_without_out_pushes_and_keeps_nothing(fake_hub: FakeHub, exportable: tuple[Path, Path],
                                                     tmp_path: Path) -> None:
    base, plan = exportable
    env = hub_env(fake_hub.url, tmp_path / "hf_home")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env["TMPDIR"] = str(scratch)
    result = run_export(env, base, plan, "--push-to-hub", REPO_ID)
    assert result.returncode == 0, result.stderr
    assert "into a temporary folder" in result.stdout and "pushed to" in result.stdout
    assert list(scratch.iterdir()) == []
