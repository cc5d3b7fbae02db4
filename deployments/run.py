"""`python -m deployments.run [CONFIG]`: serve the app locally with its embedded defaults.

With no REDIS_URL in the environment, an embedded redis-server is started on a free loopback
port for the lifetime of the app and stopped afterwards; then `serve run CONFIG` takes over the
terminal (Ctrl-C stops both).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from caches.redis_server import EmbeddedRedis

REPO_ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    config = sys.argv[1] if len(sys.argv) > 1 else str(REPO_ROOT / "configs" / "local.yaml")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    serve_bin = str(Path(sys.executable).with_name("serve"))
    server: EmbeddedRedis | None = None
    if not env.get("REDIS_URL"):
        server = EmbeddedRedis(workdir=REPO_ROOT / ".run" / "redis").start()
        env["REDIS_URL"] = server.url
        print(f"embedded Redis at {server.url} (pid file {server.pidfile})", flush=True)
    try:
        return subprocess.call([serve_bin, "run", config], env=env, cwd=REPO_ROOT)
    except KeyboardInterrupt:
        return 0
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
