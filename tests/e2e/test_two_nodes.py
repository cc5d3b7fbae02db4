"""The app across two Ray nodes: chat, recommendations, events and cache coherence between nodes.

tests/e2e/two_nodes.py runs in a subprocess (a driver joins one Ray cluster only, and this pytest
process may hold the session app's): a head and a worker node from `ray.cluster_utils.Cluster`,
the LLM on the head, the Ingress on the worker, one Recommender replica per node each with its
own RocksDB. The test asserts on the JSON it writes. The subprocess gets a private RAY_TMPDIR, so
the address file that Cluster writes never redirects another developer's `ray.init()`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from deployments.config import REPO_ROOT

TIMEOUT_S = 420
GLOBAL_ADDRESS_FILE = Path("/tmp/ray/ray_current_cluster")


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    if not (REPO_ROOT / ".models" / "tiny-llama").exists():
        pytest.skip("the tiny model is not installed: run `make models`")
    before = GLOBAL_ADDRESS_FILE.read_text() if GLOBAL_ADDRESS_FILE.exists() else None
    # Short: Ray's Unix socket paths live under it and must stay under ~107 characters.
    private_tmp = tempfile.mkdtemp(prefix="ts2n-", dir="/tmp")
    out = Path(private_tmp) / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=private_tmp, PYTHONPATH=str(REPO_ROOT))
    try:
        proc = subprocess.run([sys.executable, "-m", "tests.e2e.two_nodes", str(out)], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT_S)
        assert proc.returncode == 0, proc.stderr[-6000:]
        after = GLOBAL_ADDRESS_FILE.read_text() if GLOBAL_ADDRESS_FILE.exists() else None
        assert after == before, "the two-node cluster wrote the machine-wide Ray address file"
        return json.loads(out.read_text())
    finally:
        shutil.rmtree(private_tmp, ignore_errors=True)


def test_two_nodes_with_their_own_labels(report: dict[str, Any]) -> None:
    assert [n["role"] for n in report["nodes"]] == ["llm", "recs"]
    assert [n["labels"] for n in report["nodes"]] == [{"tierserve.io/node": "llm"}, {"tierserve.io/node": "recs"}]


def test_deployments_are_spread_over_both_nodes(report: dict[str, Any]) -> None:
    placement = report["placement"]
    assert set(placement["LLM"].values()) == {"llm"}
    assert set(placement["Encoder"].values()) == {"llm"}
    assert set(placement["Ingress"].values()) == {"recs"}
    assert sorted(placement["Recommender"].values()) == ["llm", "recs"]


def test_chat_across_nodes(report: dict[str, Any]) -> None:
    # Ingress on one node, Encoder, SemanticCache and LLM on the other, Redis shared.
    chat = report["chat"]
    assert chat["status"] == [200, 200]
    assert chat["x_cache"][1] == "exact" and chat["same_answer"], chat


def test_recommendations_from_a_replica_on_each_node(report: dict[str, Any]) -> None:
    assert sorted(report["replicas_before"]) == sorted(report["placement"]["Recommender"])


def test_an_event_invalidates_the_users_features_on_both_nodes(report: dict[str, Any]) -> None:
    assert report["event"]["status"] == 202, report["event"]
    # Each node's SSD tier held the user's features before the event, neither after it, and
    # before any read: the replica on the other node dropped its copy from the invalidation
    # stream, not from a read that noticed the user's generation had moved.
    assert all(report["ssd_before"].values()), report["ssd_before"]
    assert not any(report["ssd_after"].values()), report["ssd_after"]
    other_node = [r for r in report["ssd_after"] if r != report["event"]["replica"]]
    assert len(other_node) == 1 and report["ssd_after"][other_node[0]] is False
    # And each replica's next answer is computed from the pushed row.
    after = report["after_event"]
    assert sorted(after) == sorted(report["placement"]["Recommender"])
    for replica, seen in after.items():
        assert seen["top_item_gone"], (replica, seen)
        assert seen["n_ratings"] == seen["n_ratings_before"] + 1, (replica, seen)
        assert seen["user_source"] != "rocksdb", (replica, seen)

