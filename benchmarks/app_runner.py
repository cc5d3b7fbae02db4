"""Ray, an embedded Redis and Serve started here for a benchmark that deploys its own apps.

`serve_here` is the start-up `benchmarks.recommend_load` (the real app plus a feast-only one) and
`benchmarks.recs_floor` (two Ingress + Recommender apps, no chat) share: a temp folder, a Feast
repo for the benchmark's `--ratings`, Redis, Ray with configs/local.yaml's runtime environment and
Serve on a free port. What each deploys on it stays in its own module. `report` writes their
figures the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def _say(msg: str) -> None:
    print(msg, flush=True)


def feature_repo(args: argparse.Namespace, work: Path) -> Path:
    """A Feast repo for --ratings in `work`: a copy of the project's when built from the same input."""
    from feature_store import names
    from feature_store.pipeline import PACKAGE_DIR, build_repo, is_complete, model_version

    movies = args.movies
    if movies is None and (args.ratings.parent / "movies.csv").exists():
        movies = args.ratings.parent / "movies.csv"
    params = dict(user_col=args.user_col, item_col=args.item_col, rating_col=args.rating_col or None,
                  time_col=args.time_col, embedding_dim=32, limit=None)
    version = model_version(args.ratings.resolve(), movies.resolve() if movies else None, **params)
    target = work / "feature_repo"
    if is_complete(PACKAGE_DIR, version):
        target.mkdir(parents=True)
        shutil.copyfile(PACKAGE_DIR / "feature_store.yaml", target / "feature_store.yaml")
        shutil.copytree(PACKAGE_DIR / names.DATA_DIR, target / names.DATA_DIR,
                        ignore=shutil.ignore_patterns(".build.lock", "*.tmp"))
        _say(f"feature repo: copied the project's build of the same input ({version})")
        return target
    _say(f"feature repo: building from {args.ratings} (a minute or two: Feast import, SVD, materialise)")
    build_repo(args.ratings, target, movies, progress=False, **params)  # type: ignore[arg-type]
    return target


def report(out: dict[str, Any], target: Path) -> None:
    """The figures to `target` (indented) and, as the last line printed, on stdout (one line)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(out, indent=2) + "\n")
    _say(f"written to {target}")
    print(json.dumps(out), flush=True)


def wait_running(app_names: list[str], timeout_s: float = 900) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        apps = serve.status().applications
        states = {n: apps[n].status if n in apps else "MISSING" for n in app_names}
        failed = [n for n, s in states.items() if s == "DEPLOY_FAILED"]
        if failed:
            raise RuntimeError(f"{failed} failed to deploy: {apps[failed[0]].message}")
        if all(s == "RUNNING" for s in states.values()):
            return
        time.sleep(2)
    raise TimeoutError(f"apps not running after {timeout_s:.0f}s: {states}")


@dataclass
class Started:
    """What `serve_here` started: configs/local.yaml's first application and Serve's HTTP port."""

    cfg: dict[str, Any]
    port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextmanager
def serve_here(args: argparse.Namespace, *, prefix: str, ray_prefix: str, extra_env: dict[str, str] | None = None,
               redis_from_env: bool = False) -> Iterator[Started]:
    """Ray + Serve + Redis here until the block ends, for apps the caller deploys.

    `prefix` / `ray_prefix` name the temp folders (the work folder, Ray's session folder);
    `redis_from_env`: use REDIS_URL when set instead of starting an embedded Redis.
    """
    import ray
    import yaml
    from ray import serve

    from caches.redis_server import EmbeddedRedis, free_port

    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
        repo = feature_repo(args, work)
        env_url = os.environ.get("REDIS_URL") if redis_from_env else None
        redis_url = env_url or stack.enter_context(EmbeddedRedis(workdir=work / "redis")).url
        cfg = yaml.safe_load((REPO_ROOT / "configs" / "local.yaml").read_text())["applications"][0]
        # build_app lets these variables win over its args: point them at this run's resources.
        env = {"REDIS_URL": redis_url, "TIERSERVE_FEAST_REPO": str(repo), "TIERSERVE_STATE_DIR": str(work / "state"),
               **(extra_env or {})}
        os.environ.update(env)
        ray.init(num_cpus=4, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix=ray_prefix, dir="/tmp"),
                 runtime_env={"env_vars": {**cfg["runtime_env"]["env_vars"], **env}}, log_to_driver=False)
        stack.callback(ray.shutdown)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        stack.callback(serve.shutdown)
        yield Started(cfg=cfg, port=port)
