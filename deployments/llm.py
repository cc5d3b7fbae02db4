"""LLM deployment: vLLM's in-process async engine behind vLLM's own OpenAI serving layer.

The replica owns one `AsyncLLM` with prefix caching on, and reuses vLLM's `OpenAIServingChat`
(request validation, chat template, sampling params, streaming chunks, usage with
`prompt_tokens_details.cached_tokens`) instead of re-implementing the protocol. The ingress has
already rebuilt the messages shared-first (caches.prompts) and passes the tenant, which becomes
vLLM's `cache_salt` so KV blocks are never shared across tenants.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncGenerator
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from caches.fingerprint import fingerprint_model
from deployments import metrics
from deployments.config import LLMSettings
from deployments.routing import PrefixAffinityRouter

log = logging.getLogger("tierserve.llm")


def _engine_env(settings: LLMSettings) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_space_gib))
    # Ray already pins replicas to CPUs; vLLM's own OMP binding would fight it on small hosts.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


def _stat_loggers() -> list[Any] | None:
    """In a Serve replica, two Prometheus loggers: vLLM's Ray one records this replica's engine
    series through ray.util.metrics (Ray's per-node endpoint, `ray_vllm_*` with a ReplicaId tag:
    what Prometheus scrapes), the plain one keeps them in this process's registry for the app's
    debug page. Ray's first: the plain one clears vLLM's entries from that registry. Outside a
    replica (tests of the engine alone) vLLM's default, the plain one."""
    if metrics.replica_id() is None:
        return None
    from vllm.v1.metrics.loggers import PrometheusStatLogger
    from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

    return [RayPrometheusStatLogger, PrometheusStatLogger]


def engine_cli_args(settings: LLMSettings) -> list[str]:
    args = [
        "--model", settings.model,
        "--served-model-name", settings.served_model_name,
        "--dtype", settings.dtype,
        "--max-model-len", str(settings.max_model_len),
        "--enable-prompt-tokens-details",
        "--gpu-memory-utilization", str(settings.gpu_memory_utilization),
        "--enable-prefix-caching" if settings.enable_prefix_caching else "--no-enable-prefix-caching",
    ]
    if settings.block_size:
        args += ["--block-size", str(settings.block_size)]
    if settings.enforce_eager:
        args.append("--enforce-eager")
    return args + list(settings.extra_engine_args)


# The first item of a chat stream: who answers (not forwarded to the client).
META_PREFIX = "tierserve-meta:"


def model_fingerprint(settings: LLMSettings, model_config: Any) -> str:
    """Weights, config and the engine settings that change outputs (see caches.fingerprint)."""
    import vllm

    outputs = {
        "dtype": str(getattr(model_config, "dtype", settings.dtype)),
        "max_model_len": model_config.max_model_len,
        "quantization": getattr(model_config, "quantization", None),
        "revision": getattr(model_config, "revision", None),
        "extra_engine_args": settings.extra_engine_args,
        "vllm": vllm.__version__,
    }
    hf_config = getattr(model_config, "hf_config", None)
    loaded = hf_config.to_json_string() if hasattr(hf_config, "to_json_string") else ""
    return fingerprint_model(settings.model, outputs, loaded)


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, err_type: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.err_type, self.param = status, message, err_type, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.err_type, "param": self.param, "code": self.status}}


class LLMServer:
    """vLLM engine + vLLM's OpenAI chat and completion serving, with no Ray in sight (tests use it directly)."""

    def __init__(self, settings: LLMSettings, engine: Any, chat_serving: Any, completion_serving: Any = None) -> None:
        self.settings, self.engine, self.chat_serving = settings, engine, chat_serving
        self.completion_serving = completion_serving
        self.max_model_len = engine.model_config.max_model_len
        self.fingerprint = model_fingerprint(settings, engine.model_config)
        # What vLLM applies when a request leaves a sampling field out: the model's generation
        # config, read by vLLM itself. The caches decide "greedy or not" from this, never assume.
        self.default_sampling = dict(getattr(chat_serving, "default_sampling_params", None) or {})
        # The completion route's own copy (vLLM's OpenAIServingCompletion reads it separately).
        self.completion_default_sampling = (
            dict(getattr(completion_serving, "default_sampling_params", None) or {})
            if completion_serving is not None else None)

    @classmethod
    async def create(cls, settings: LLMSettings) -> LLMServer:
        _engine_env(settings)
        from starlette.datastructures import State
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from vllm.v1.engine.async_llm import AsyncLLM

        started = time.monotonic()
        args = make_arg_parser(FlexibleArgumentParser()).parse_args(engine_cli_args(settings))
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs.from_cli_args(args), stat_loggers=_stat_loggers())
        state = State()
        await init_app_state(engine, state, args, supported_tasks=await engine.get_supported_tasks())
        log.info("vLLM engine for %s ready in %.1fs", settings.served_model_name, time.monotonic() - started)
        return cls(settings, engine, state.openai_serving_chat, state.openai_serving_completion)

    def shutdown(self) -> None:
        self.engine.shutdown()

    def _request(self, body: dict[str, Any], tenant: str, kind: str = "chat"):
        from pydantic import ValidationError
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.exceptions import VLLMClientError

        request_cls = CompletionRequest if kind == "completion" else ChatCompletionRequest
        try:
            return request_cls.model_validate({**body, "cache_salt": tenant})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise OpenAIError(400, f"Invalid request at '{where}': {first.get('msg')}", param=where) from exc
        except VLLMClientError as exc:
            # vLLM's own validators raise these past pydantic (`stream_options` without
            # `stream: true`): the request's fault, a 400 that says what to change, not a 503.
            raise OpenAIError(400, str(exc), param=getattr(exc, "parameter", None)) from exc

    async def _run(self, body: dict[str, Any], tenant: str, kind: str = "chat"):
        """One request through vLLM's serving layer: "chat" (OpenAIServingChat) or "completion"
        (OpenAIServingCompletion, the legacy route), the tenant as `cache_salt` either way."""
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.exceptions import VLLMClientError

        request = self._request(body, tenant, kind)
        try:
            if kind == "completion":
                result = await self.completion_serving.create_completion(request, None)
            else:
                result = await self.chat_serving.create_chat_completion(request, None)
        except (VLLMClientError, ValueError) as exc:
            raise OpenAIError(400, str(exc), param=getattr(exc, "parameter", None)) from exc
        if isinstance(result, ErrorResponse):
            err = result.error
            status = 400 if err.code in (404, 422) else int(err.code or 400)
            raise OpenAIError(status, err.message, err.type or "invalid_request_error", err.param)
        return result

    async def chat(self, body: dict[str, Any], tenant: str) -> dict[str, Any]:
        """A non-streaming completion: {"status": 200, "body": ...} or an OpenAI error body, with
        the fingerprint of the model that answered (the ingress stores only matching answers)."""
        try:
            result = await self._run({**body, "stream": False}, tenant)
        except OpenAIError as exc:
            return {"status": exc.status, "body": exc.body(), "fingerprint": self.fingerprint}
        body_out = result.model_dump(mode="json", exclude_none=True)
        return {"status": 200, "body": body_out, "fingerprint": self.fingerprint}

    async def chat_stream(self, body: dict[str, Any], tenant: str) -> AsyncGenerator[str, None]:
        """First a meta line (``META_PREFIX`` + JSON with the model fingerprint), then the SSE
        lines as vLLM writes them ("data: {...}\\n\\n", ending with "data: [DONE]"); a request
        error is one JSON object instead of SSE lines."""
        import json

        yield META_PREFIX + json.dumps({"fingerprint": self.fingerprint})
        try:
            generator = await self._run({**body, "stream": True}, tenant)
        except OpenAIError as exc:
            yield json.dumps({"status": exc.status, **exc.body()})
            return
        async for chunk in generator:
            yield chunk

    async def complete(self, body: dict[str, Any], tenant: str) -> dict[str, Any]:
        """A non-streaming legacy completion, answered like `chat` (with the fingerprint)."""
        try:
            result = await self._run({**body, "stream": False}, tenant, "completion")
        except OpenAIError as exc:
            return {"status": exc.status, "body": exc.body(), "fingerprint": self.fingerprint}
        return {"status": 200, "body": result.model_dump(mode="json", exclude_none=True), "fingerprint": self.fingerprint}

    async def complete_stream(self, body: dict[str, Any], tenant: str) -> AsyncGenerator[str, None]:
        """A streamed legacy completion in `chat_stream`'s protocol: the meta line, then SSE lines
        or one JSON error object."""
        import json

        yield META_PREFIX + json.dumps({"fingerprint": self.fingerprint})
        try:
            generator = await self._run({**body, "stream": True}, tenant, "completion")
        except OpenAIError as exc:
            yield json.dumps({"status": exc.status, **exc.body()})
            return
        async for chunk in generator:
            yield chunk

    def info(self) -> dict[str, Any]:
        return {
            "id": self.settings.served_model_name,
            "max_model_len": self.max_model_len,
            "version": self.settings.model_version,
            "system_prompt": self.settings.system_prompt,
            "max_tokens_limit": self.settings.max_tokens_limit,
            "fingerprint": self.fingerprint,
            "default_sampling": self.default_sampling,
            "completion_default_sampling": self.completion_default_sampling,
        }



@serve.deployment(
    name="LLM",
    max_ongoing_requests=16,
    ray_actor_options={"num_cpus": 0.5},
    request_router_config=RequestRouterConfig(request_router_class=PrefixAffinityRouter),
)
class LLMDeployment:
    """One vLLM engine per replica; prefix-cache and latency stats come from vLLM's own metrics."""

    async def __init__(self, settings: dict[str, Any]) -> None:
        self.server = await LLMServer.create(LLMSettings.model_validate(settings))
        self.replica_id = serve.get_replica_context().replica_id.unique_id

    async def chat(self, body: dict[str, Any], tenant: str) -> dict[str, Any]:
        return {**await self.server.chat(body, tenant), "replica": self.replica_id}

    async def chat_stream(self, body: dict[str, Any], tenant: str) -> AsyncGenerator[str, None]:
        async for chunk in self.server.chat_stream(body, tenant):
            yield chunk

    async def complete(self, body: dict[str, Any], tenant: str) -> dict[str, Any]:
        return {**await self.server.complete(body, tenant), "replica": self.replica_id}

    async def complete_stream(self, body: dict[str, Any], tenant: str) -> AsyncGenerator[str, None]:
        async for chunk in self.server.complete_stream(body, tenant):
            yield chunk

    def info(self) -> dict[str, Any]:
        return self.server.info()

    def metrics_text(self) -> tuple[str, bytes]:
        return metrics.replica_exposition()

    def check_health(self) -> None:
        if self.server.engine.errored:
            raise RuntimeError("vLLM engine errored")
