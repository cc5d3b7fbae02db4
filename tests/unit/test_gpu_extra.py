"""The `gpu` extra resolves for the cluster's platform: linux x86_64, CPython 3.11.

A GPU node installs `pip install ".[gpu]"` (the Dockerfile does); a pin that does not exist on the
index (as `faiss-gpu-cu12==1.15.1` once did) only shows up there, long after review. pip's
resolver answers the same question here with no GPU and nothing installed: a dry run for the
target platform, wheels only (a CUDA build cannot come from an sdist on this machine).

Needs the package index; skips, saying so, only when the index cannot be reached.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
# pip takes --platform tags literally (no "this glibc or older"), so list every tag the image's
# glibc accepts: the Ray CUDA base images are Ubuntu 22.04, glibc 2.35. vLLM needs some that only
# ship manylinux_2_31 wheels (llguidance 1.7+), so the three tags manylinux_2_28/2_17/2014 alone
# are not enough.
IMAGE_GLIBC_MINOR = 35
PLATFORMS = (
    *(f"manylinux_2_{minor}_x86_64" for minor in range(IMAGE_GLIBC_MINOR, 16, -1)),
    "manylinux2014_x86_64",
)
DEFAULT_INDEX = "https://pypi.org/simple"
_MACHINE_LOCAL_PIP = ("PIP_FIND_LINKS", "PIP_CONSTRAINT", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX", "PIP_REQUIRE_VIRTUALENV")
# Signatures of pip failing to reach the index (not of a resolution failure).
_NETWORK_ERRORS = (
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "Max retries exceeded",
    "ConnectTimeoutError",
    "Read timed out",
)


def gpu_requirements() -> list[str]:
    """The base dependencies and the `gpu` extra, as pinned in pyproject.toml."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"]) + list(project["optional-dependencies"]["gpu"])


def _index_url() -> str:
    return os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX


def _index_reachable(url: str) -> str | None:
    """None when the index answers, else why not."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/pip/", timeout=15) as resp:
            resp.read(1)
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_extra_resolves_for_linux_x86_64_cpython_311(tmp_path: Path) -> None:
    index = _index_url()
    why = _index_reachable(index)
    if why:
        pytest.skip(f"package index {index} unreachable ({why}): the GPU extra was not resolved")

    reqs = gpu_requirements()
    assert any(r.startswith("faiss-gpu==") for r in reqs)
    report = tmp_path / "report.json"
    cmd = [
        sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
        "--only-binary=:all:", "--python-version", "3.11",
        *[arg for p in PLATFORMS for arg in ("--platform", p)],
        "--target", str(tmp_path / "target"), "--quiet", "--report", str(report),
        *reqs,
    ]  # fmt: skip
    # The index only, as a GPU node sees it: this machine's pip config and wheel folders (a torch
    # CPU build on disk, a cap on torch's version) are not the cluster's, so they are left out.
    env = {k: v for k, v in os.environ.items() if k not in _MACHINE_LOCAL_PIP}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=570)
    if proc.returncode != 0:
        out = proc.stdout + proc.stderr
        if any(sig in out for sig in _NETWORK_ERRORS):
            pytest.skip(f"package index unreachable during resolution: {out[-500:]}")
        pytest.fail(f"the gpu extra does not resolve for linux x86_64 / CPython 3.11:\n{out[-4000:]}")

    resolved = {
        item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    for req in ("vllm==0.32.0", "faiss-gpu==1.15.1", "ray==2.60.0"):
        name, version = req.split("==")
        assert resolved.get(name) == version, f"{name}: resolved {resolved.get(name)}, pinned {version}"
    # The CUDA build of torch, not a CPU one.
    assert "+cpu" not in resolved.get("torch", ""), resolved.get("torch")
