"""Two Ray nodes on this machine, the app spread over both; prints what it saw as JSON.

Run by tests/e2e/test_two_nodes.py in its own process: a driver can be connected to one Ray
cluster only, and the session app of tests/e2e/conftest.py has its own. Not a test module.

    RAY_TMPDIR=/tmp/ts2n-x python -m tests.e2e.two_nodes OUT.json

`ray.cluster_utils.Cluster` starts a head and a worker node (each with its own raylet, object
store and metrics agent) with different custom resources and labels. The LLM, Encoder and
SemanticCache go to the head ("llm" node) through a custom resource, the Ingress to the worker
("recs" node), and the Recommender gets one replica per node, each with its own RocksDB. The
Cluster writes its address to $RAY_TMPDIR/ray/ray_current_cluster: the caller points RAY_TMPDIR at
a private directory so that no other `ray.init()` on the machine finds this cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import redis
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
APP = "tierserve-2n"
LLM_NODE, RECS_NODE = "ts_llm_node", "ts_recs_node"
USER = 7


def _app_args(tiny_model: str) -> dict[str, Any]:
    cfg = yaml.safe_load((REPO_ROOT / "configs" / "local.yaml").read_text())["applications"][0]
    args = cfg.get("args") or {}
    args["llm"] = {**args.get("llm", {}), "model": tiny_model, "served_model_name": "tiny-llama",
                   "max_model_len": 512, "kv_cache_space_gib": 1}
    # Every request computes, so that every request reads the user's features through the tiers.
    args["recommender"] = {**args.get("recommender", {}), "result_cache": False}
    return args


def _replica_nodes() -> dict[str, dict[str, str]]:
    """deployment -> {replica id: node role}, from the GCS actor table (no dashboard needed)."""
    import ray

    roles = {n["NodeID"]: ("llm" if LLM_NODE in n["Resources"] else "recs") for n in ray.nodes() if n["Alive"]}
    out: dict[str, dict[str, str]] = {}
    for info in ray._private.state.actors().values():  # the public state API needs the dashboard
        name = info.get("Name") or ""
        if info.get("State") != "ALIVE" or not name.startswith(f"SERVE_REPLICA::{APP}#"):
            continue
        _, deployment, replica = name.split("::", 1)[1].split("#")
        out.setdefault(deployment, {})[replica] = roles.get(info["Address"]["NodeID"], "?")
    return out


def _ssd_holds_user(state_dir: Path, replica: str) -> bool:
    """Whether this replica's RocksDB (its node's SSD tier) holds the user's feature entry; opened
    read-only beside the replica, which keeps it open for writing."""
    from rocksdict import AccessType, Options, Rdict

    from feature_store.names import USER_VIEW

    # recommender-<replica>/<build>-version-<v>/users (deployments/recommender*.py)
    for path in (state_dir / "rocksdb" / f"recommender-{replica}").glob("*/users"):
        db = Rdict(str(path), Options(raw_mode=True), access_type=AccessType.read_only())
        try:
            keys = [k.decode() for k in db.keys()]  # noqa: SIM118 - Rdict, not a dict
        finally:
            db.close()
        if any(k.startswith(f"features:{USER_VIEW}:") and k.endswith(f":{USER}") for k in keys):
            return True
    return False


def _drop_ram_copy(r: redis.Redis) -> None:
    """Delete the user's shared RAM-tier copy, so that the next replica's read is cold and fills its
    own SSD tier (with the RAM copy there it would never touch its RocksDB)."""
    from feature_store.names import USER_VIEW

    keys = list(r.scan_iter(f"features:{USER_VIEW}:*:{USER}"))
    if keys:
        r.delete(*keys)


def main(out_path: str) -> None:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from caches.redis_server import EmbeddedRedis, free_port
    from tests.support import wait_app_running

    t0 = time.monotonic()
    report: dict[str, Any] = {"timings_s": {}}
    work = Path(tempfile.mkdtemp(prefix="ts2n-work-"))
    redis_server = EmbeddedRedis(workdir=work / "redis").start()
    state_dir = work / "state"
    feast_repo = work / "feast" / "feature_store"
    shutil.copytree(REPO_ROOT / "feature_store", feast_repo, ignore=shutil.ignore_patterns("__pycache__"))
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_CPU_OMP_THREADS_BIND": "nobind", "REDIS_URL": redis_server.url,
           "TIERSERVE_STATE_DIR": str(state_dir), "TIERSERVE_FEAST_REPO": str(feast_repo)}
    os.environ.update(env)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {LLM_NODE: 1}, "labels": {"tierserve.io/node": "llm"},
        "include_dashboard": False,
    })
    cluster.add_node(num_cpus=1, resources={RECS_NODE: 1}, labels={"tierserve.io/node": "recs"})
    try:
        ray.init(address=cluster.address, runtime_env={"env_vars": env}, log_to_driver=False)
        report["nodes"] = sorted(
            ({"role": "llm" if LLM_NODE in n["Resources"] else "recs",
              "labels": {k: v for k, v in (n.get("Labels") or {}).items() if k.startswith("tierserve")}}
             for n in ray.nodes() if n["Alive"]), key=lambda n: n["role"])
        report["timings_s"]["cluster"] = round(time.monotonic() - t0, 1)
        port = free_port()
        # One proxy: two on one machine would both want the same port.
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        serve.run(_build(str(REPO_ROOT / ".models" / "tiny-llama")), name=APP, route_prefix="/", blocking=False)
        wait_app_running(APP, timeout_s=240)
        report["timings_s"]["deployed"] = round(time.monotonic() - t0, 1)
        report["placement"] = _replica_nodes()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            report.update(_exercise(client, redis.Redis.from_url(redis_server.url), state_dir))
        report["timings_s"]["checked"] = round(time.monotonic() - t0, 1)
    finally:
        try:
            serve.shutdown()
            ray.shutdown()
        finally:
            cluster.shutdown()
            redis_server.stop()
            shutil.rmtree(work, ignore_errors=True)
    Path(out_path).write_text(json.dumps(report, indent=2))


def _build(tiny_model: str) -> Any:
    from deployments.config import AppSettings
    from deployments.encoder import EncoderDeployment
    from deployments.ingress import Ingress
    from deployments.llm import LLMDeployment
    from deployments.recommender import RecommenderDeployment
    from deployments.semantic_cache import SemanticCacheDeployment

    s = AppSettings.from_args(_app_args(tiny_model))
    on_llm = {"resources": {LLM_NODE: 0.01}}
    c = s.cache
    encoder = EncoderDeployment.options(ray_actor_options={"num_cpus": 0.25, **on_llm}).bind(
        s.redis, s.state_dir, c.embedding_ram_budget_bytes, c.embedding_ssd_budget_bytes)
    semantic = SemanticCacheDeployment.options(ray_actor_options={"num_cpus": 0.1, **on_llm}).bind(s.redis, c.model_dump())
    llm = LLMDeployment.options(ray_actor_options={"num_cpus": 0.5, **on_llm}).bind(s.llm.model_dump())
    # One replica per node: each has its own RocksDB, the coherence under test.
    recommender = RecommenderDeployment.options(num_replicas=2, max_replicas_per_node=1,
                                                ray_actor_options={"num_cpus": 0.25}).bind(
        s.redis, s.state_dir, s.recommender.model_dump())
    return Ingress.options(ray_actor_options={"num_cpus": 0.25, "resources": {RECS_NODE: 0.01}}).bind(
        s.model_dump(), encoder, semantic, llm, recommender)


def _recommend(client: httpx.Client) -> dict[str, Any]:
    resp = client.post("/v1/recommendations", json={"user_id": USER, "k": 5})
    resp.raise_for_status()
    return resp.json()


def _exercise(client: httpx.Client, r: redis.Redis, state_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    body = {"model": "tiny-llama", "temperature": 0, "max_tokens": 8,
            "messages": [{"role": "user", "content": "Name one colour."}]}
    first = client.post("/v1/chat/completions", json=body)
    second = client.post("/v1/chat/completions", json=body)
    out["chat"] = {"status": [first.status_code, second.status_code],
                   "x_cache": [first.headers.get("x-cache"), second.headers.get("x-cache")],
                   "same_answer": first.status_code == 200 and second.status_code == 200
                   and first.json()["choices"][0]["message"]["content"] == second.json()["choices"][0]["message"]["content"]}

    # Warm the user's features on each replica's SSD tier: each read after the RAM copy is gone is
    # cold (Feast) and fills that replica's RocksDB.
    before: dict[str, dict[str, Any]] = {}
    for _ in range(60):
        _drop_ram_copy(r)
        answer = _recommend(client)
        before.setdefault(answer["replica"], answer)
        if len(before) == 2:
            break
    out["replicas_before"] = sorted(before)
    out["ssd_before"] = {rep: _ssd_holds_user(state_dir, rep) for rep in before}
    last = next(iter(before.values()))
    top = last["items"][0]["item_id"]
    n_before = last["user_activity"]["n_ratings"]

    event = client.post("/v1/events", json={"user_id": USER, "item_id": top, "type": "rating", "value": 5.0})
    out["event"] = {"status": event.status_code, **(event.json() if event.status_code == 202 else {"text": event.text})}
    time.sleep(1.0)  # the invalidation stream delivers in milliseconds; a second is plenty
    out["ssd_after"] = {rep: _ssd_holds_user(state_dir, rep) for rep in before}

    after: dict[str, dict[str, Any]] = {}
    for _ in range(60):
        answer = _recommend(client)
        rep = answer["replica"]
        if rep not in after:
            after[rep] = {"top_item_gone": top not in [i["item_id"] for i in answer["items"]],
                          "n_ratings": answer["user_activity"]["n_ratings"], "n_ratings_before": n_before,
                          "user_source": answer["sources"]["user"]}
        if len(after) == 2:
            break
    out["after_event"] = after
    return out


if __name__ == "__main__":
    main(sys.argv[1])
