"""The `tierserve` CLI: its commands exist, and the HTTP ones send the right request and fail cleanly.

A tiny stdlib HTTP server plays the app, records what it receives and answers like the real routes.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from deployments.cli import app

REPO_ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ("prepare-models", "build-features", "calibrate", "precompute-embeddings", "bump-version", "stats", "bench")
STATS = {
    "exact": {"entries": 3, "bytes": 4096},
    "semantic": {"entries": 2},
    "recommender": {"users": {"ram_hits": 5}},
    "lookups_by_tenant": {"exact": {"default": {"hit": 3.0, "miss": 1.0}}},
}

runner = CliRunner()


class FakeApp(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[dict[str, Any]] = []
        self.required_key: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: FakeApp

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass

    def _answer(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self, body: bytes | None) -> bool:
        self.server.requests.append(
            {
                "method": self.command,
                "path": self.path,
                "authorization": self.headers.get("authorization"),
                "content_type": self.headers.get("content-type"),
                "json": json.loads(body) if body else None,
            }
        )
        key = self.server.required_key
        if key and self.headers.get("authorization") != f"Bearer {key}":
            self._answer(401, {"error": {"message": "Missing or invalid API key", "code": 401}})
            return False
        return True

    def do_GET(self) -> None:
        if not self._record(None):
            return
        if self.path == "/v1/cache/stats":
            self._answer(200, STATS)
        else:
            self._answer(404, {"error": {"message": "not found", "code": 404}})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if not self._record(body):
            return
        name = self.path.removeprefix("/admin/models/").removesuffix("/version")
        if name == "known-model":
            self._answer(200, {"model": name, "version": json.loads(body)["version"], "previous": "v1"})
        else:
            self._answer(404, {"error": {"message": f"unknown model '{name}'", "code": 404}})


@pytest.fixture
def fake_app() -> Iterator[FakeApp]:
    server = FakeApp()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def dead_url() -> str:
    """A loopback port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(autouse=True)
def _no_ambient_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TIERSERVE_API_KEY", raising=False)
    monkeypatch.delenv("TIERSERVE_URL", raising=False)


def test_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output


def test_help_is_fast_because_imports_are_lazy() -> None:
    code = "import sys, deployments.cli; print(sorted(m for m in ('httpx', 'feast', 'torch', 'transformers', 'ray', 'pandas') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_bump_version_posts_the_version_with_the_bearer_key(fake_app: FakeApp, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_app.required_key = "sk-test"
    monkeypatch.setenv("TIERSERVE_API_KEY", "sk-test")
    result = runner.invoke(app, ["bump-version", "known-model", "v2", "--url", fake_app.url])
    assert result.exit_code == 0, result.output
    assert "v1 -> v2" in result.output
    (req,) = fake_app.requests
    assert req["method"] == "POST" and req["path"] == "/admin/models/known-model/version"
    assert req["json"] == {"version": "v2"} and req["content_type"] == "application/json"
    assert req["authorization"] == "Bearer sk-test"


def test_no_key_sends_no_auth_header_and_401_is_explained(fake_app: FakeApp) -> None:
    fake_app.required_key = "sk-test"
    result = runner.invoke(app, ["stats", "--url", fake_app.url])
    assert result.exit_code == 1
    assert fake_app.requests[0]["authorization"] is None
    assert "TIERSERVE_API_KEY" in result.output
    assert "Traceback" not in result.output


def test_error_answers_exit_non_zero_with_the_message(fake_app: FakeApp) -> None:
    result = runner.invoke(app, ["bump-version", "nope", "v2", "--url", fake_app.url + "/"])
    assert result.exit_code == 1
    assert "404" in result.output and "unknown model 'nope'" in result.output
    assert fake_app.requests[0]["path"] == "/admin/models/nope/version"


def test_stats_gets_and_pretty_prints(fake_app: FakeApp) -> None:
    result = runner.invoke(app, ["stats", "--url", fake_app.url, "--api-key", "k1"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    (req,) = fake_app.requests
    assert (req["method"], req["path"], req["authorization"]) == ("GET", "/v1/cache/stats", "Bearer k1")
    assert '"entries": 3' in result.output
    assert "75.0%" in result.output  # hit rate of the exact layer: 3 hits of 4 lookups

    raw = runner.invoke(app, ["stats", "--url", fake_app.url, "--json"])
    assert raw.exit_code == 0 and json.loads(raw.output) == STATS


@pytest.mark.parametrize("command", [["stats"], ["bump-version", "m", "v2"]])
def test_unreachable_url_is_a_clear_error(command: list[str], dead_url: str) -> None:
    result = runner.invoke(app, [*command, "--url", dead_url, "--timeout", "2"])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)  # typer.Exit, not an unhandled exception
    assert "cannot reach" in result.output and dead_url in result.output
    assert "Traceback" not in result.output


def test_bench_runs_the_module_with_its_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def fake_call(cmd: list[str], cwd: Path) -> int:
        calls.append(cmd)
        return 3

    monkeypatch.setattr(subprocess, "call", fake_call)
    result = runner.invoke(app, ["bench", "simulate_policies", "--limit", "10", "--help"])
    assert result.exit_code == 3  # the benchmark's own exit status
    assert calls == [[sys.executable, "-m", "benchmarks.simulate_policies", "--limit", "10", "--help"]]

    unknown = runner.invoke(app, ["bench", "no_such_bench"])
    assert unknown.exit_code == 1 and "available:" in unknown.output


def test_calibrate_delegates_to_caches_calibrate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from caches import calibrate

    seen: list[list[str]] = []
    monkeypatch.setattr(calibrate, "main", lambda argv: seen.append(list(argv)))
    out = tmp_path / "cal.json"
    result = runner.invoke(app, ["calibrate", "--pairs", "a.csv", "--pairs", "b.csv", "--target-precision", "0.95", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert seen == [["--pairs", "a.csv", "--pairs", "b.csv", "--target-precision", "0.95", "--out", str(out)]]
    bad = runner.invoke(app, ["calibrate", "--pairs", "a.csv", "--target-precision", "1.5"])
    assert bad.exit_code == 1


def test_prepare_models_calls_the_preparers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from deployments import models

    monkeypatch.setattr(models, "prepare_tiny", lambda: tmp_path / "tiny")
    monkeypatch.setattr(models, "prepare_smollm2", lambda: pytest.fail("--no-smollm2 was given"))
    result = runner.invoke(app, ["prepare-models", "--no-smollm2"])
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "tiny") in result.output


def test_build_features_passes_the_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from feature_store import pipeline

    ratings = tmp_path / "r.csv"
    ratings.write_text("u,i,t\n1,2,3\n")
    seen: dict[str, Any] = {}

    class Info:
        repo_dir, model_version, n_users, n_items, n_ratings, built_at = tmp_path, "abc", 1, 1, 1, "now"

    def fake_build(ratings_csv: Path, repo_dir: Path, movies_csv: Path | None, **kw: Any) -> Info:
        seen.update(ratings=ratings_csv, repo=repo_dir, movies=movies_csv, **kw)
        return Info()

    monkeypatch.setattr(pipeline, "build_repo", fake_build)
    args = ["build-features", "--ratings", str(ratings), "--repo-dir", str(tmp_path / "repo"), "--user-col", "u",
            "--item-col", "i", "--time-col", "t", "--rating-col", "", "--limit", "5", "--quiet", "--force"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen == {
        "ratings": ratings, "repo": tmp_path / "repo", "movies": None, "user_col": "u", "item_col": "i",
        "rating_col": None, "time_col": "t", "embedding_dim": 32, "limit": 5, "progress": False, "force": True,
    }
    missing = runner.invoke(app, ["build-features", "--ratings", str(tmp_path / "none.csv")])
    assert missing.exit_code == 1 and "not found" in missing.output


def test_precompute_embeddings_delegates_or_explains(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib
    import types

    real_import = importlib.import_module

    def missing(name: str, *a: Any) -> Any:
        if name == "caches.embedding":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *a)

    monkeypatch.setattr(importlib, "import_module", missing)
    result = runner.invoke(app, ["precompute-embeddings", "--file", "x.txt"])
    assert result.exit_code == 1 and "caches.embedding" in result.output
    assert "Traceback" not in result.output

    seen: list[list[str]] = []
    module = types.SimpleNamespace(main=lambda argv: seen.append(argv))
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: module if name == "caches.embedding" else real_import(name, *a))
    result = runner.invoke(app, ["precompute-embeddings", "--file", "x.txt", "--help"])
    assert result.exit_code == 0, result.output
    assert seen == [["--file", "x.txt", "--help"]]
