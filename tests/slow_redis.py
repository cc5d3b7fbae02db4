"""A Redis that is slow rather than dead, for tests (no fixtures: those live in conftest.py).

`stalled` makes the server that holds a key sleep (DEBUG SLEEP, from a connection of its own):
commands sent meanwhile wait, then RUN when it wakes, after their client has given up on the
reply. CLIENT PAUSE would not do: a paused server does not run them either. The client under test
must send on a warm pooled connection (run any command through it first): one it opens during the
stall times out in its handshake, before the command is ever sent."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from urllib.parse import urlparse

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from caches.redis_client import is_cluster

# A probe that gets no answer in this long means the server is asleep (a loopback PING takes
# well under a millisecond; the sleep is seconds long, so a late probe still leaves most of it).
PROBE_TIMEOUT_S = 0.2
PROBES = 25  # before giving up: the sleeper never got the server to sleep (DEBUG refused)
# The sleeper's own read timeout on top of the sleep: its reply comes once the server wakes.
SLEEPER_MARGIN_S = 10.0


def node_of(client: redis.Redis, url: str, key: str) -> tuple[str, int]:
    """(host, port) of the server that holds `key`: its primary on a cluster, the server otherwise."""
    if is_cluster(client):
        node = client.get_node_from_key(key)  # type: ignore[attr-defined]
        return str(node.host), int(node.port)
    parsed = urlparse(url)
    return parsed.hostname or "127.0.0.1", int(parsed.port or 6379)


@contextlib.contextmanager
def stalled(host: str, port: int, seconds: float) -> Iterator[None]:
    """The server at host:port asleep for `seconds` from the moment the block is entered; on
    exit, awake again (the commands sent meanwhile are ahead of any sent from then on)."""
    sleeper = redis.Redis(host=host, port=port, socket_timeout=seconds + SLEEPER_MARGIN_S)
    # never re-sent on a timeout (redis-py's default would wait the sleep out, probe after probe)
    probe = redis.Redis(host=host, port=port, socket_timeout=PROBE_TIMEOUT_S, retry=Retry(NoBackoff(), 0),
                        retry_on_error=[])
    failed: list[BaseException] = []

    def sleep() -> None:
        try:
            sleeper.execute_command("DEBUG", "SLEEP", str(seconds))
        except redis.RedisError as exc:
            failed.append(exc)

    thread = threading.Thread(target=sleep, name="redis-stall", daemon=True)
    try:
        probe.ping()  # connected before the stall: a probe's timeout is the server's, not a connect's
        thread.start()
        for _ in range(PROBES):  # until a probe goes unanswered: the sleep has begun
            try:
                probe.ping()
            except redis.TimeoutError:
                break
            if failed:
                pytest.skip(f"this Redis refuses DEBUG SLEEP: {failed[0]}")
            threading.Event().wait(PROBE_TIMEOUT_S / 4)
        else:
            pytest.fail(f"the server never fell asleep ({PROBES} probes answered)")
        yield
    finally:
        if thread.ident is not None:  # started: its reply says the server is awake
            thread.join()
        sleeper.close()
        probe.close()
