"""The application's settings: one pydantic model, filled from the Serve config's `args`.

Every field has a CPU-laptop default, so `serve run configs/local.yaml` needs nothing else;
the GPU config overrides engine and budget fields. Values that differ per environment (Redis
address, Feast repo) may also come from environment variables, which win over the file so a
KubeRay pod can point at its cluster services without editing the config.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from caches.tenancy import ENV_VAR as API_KEYS_ENV
from caches.tenancy import parse_keys

REPO_ROOT = Path(__file__).resolve().parent.parent


class _Settings(BaseModel):
    # A misspelled setting ("event_tenant") must stop the deploy with its name, not be ignored
    # while its default (here: who may send events) silently applies.
    model_config = ConfigDict(extra="forbid")


class LLMSettings(_Settings):
    model: str = str(REPO_ROOT / ".models" / "SmolLM2-135M-Instruct")
    served_model_name: str = "SmolLM2-135M-Instruct"
    model_version: str = "v1"
    dtype: str = "float32"
    max_model_len: int = 2048
    block_size: int = 32
    kv_cache_space_gib: int = 1
    enforce_eager: bool = True
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.85
    # Shared by every request and placed first: at least a few KV blocks long, so that the
    # prefix cache has whole blocks to reuse (only full blocks are cached).
    system_prompt: str = (
        "You are tierserve's assistant, a concise and helpful AI. Answer the user's question "
        "directly in one or two sentences. If you do not know the answer, say so plainly instead "
        "of guessing. Do not repeat the question, do not add disclaimers, and keep a friendly, "
        "professional tone."
    )
    max_tokens_limit: int = 1024
    extra_engine_args: list[str] = Field(default_factory=list)


# Deadlines on the calls that only serve the caches (Encoder.embed, SemanticCache.lookup/store):
# past them the request is answered by the model with `x-cache: bypass`. An embedding of a cached
# text takes milliseconds and a new one tens of milliseconds on CPU; a lookup is one FAISS search
# and one Redis read. Seconds mean something is wrong, and the model should not wait on it.
ENCODER_TIMEOUT_S = 2.0
SEMANTIC_TIMEOUT_S = 1.0


class CacheSettings(_Settings):
    # Budgets (caches/budget.py): `*_max_*` bound a cache as a whole, `*_tenant_max_*` each tenant's
    # share of it; a tenant over its share evicts its own entries, and over the global budget the
    # biggest tenant gives way, so a flood never evicts a smaller tenant's entries. Bytes are
    # counted as Redis holds them (values, keys and bookkeeping, approximately).
    # TTLs: 0 would mean "never expires" to Redis (PX 0 is no TTL), the opposite of what it reads as.
    result_ttl_s: float = Field(default=3600.0, gt=0)
    result_max_bytes: int = Field(default=64 << 20, ge=1)
    result_max_entries: int = Field(default=200_000, ge=1)
    result_tenant_max_bytes: int = Field(default=32 << 20, ge=1)
    result_tenant_max_entries: int = Field(default=100_000, ge=1)
    semantic_enabled: bool = True
    # "static" (default): the calibrated threshold and the trap guard. "verified": thresholds
    # learned from judged answers within an error budget (caches.semantic.decision.VerifiedPolicy);
    # it needs an answer judge with real recall, which SmolLM2's answers do not allow
    # (benchmarks/results/judge_calibration.json, semantic_stream_app_judge.json).
    semantic_mode: Literal["static", "verified"] = "static"
    # Verified mode: the share of wrong semantic hits it may spend (a Wilson upper bound), and the
    # highest rate at which uncertain would-be hits are sent to the model to be verified (each is a
    # model call; the rate shrinks as the evidence near that similarity grows).
    semantic_error_budget: float = Field(default=0.01, gt=0, lt=1)
    semantic_explore_rate: float = Field(default=0.05, ge=0, le=1)
    # The answer judge (caches.semantic.judge.EmbeddingJudge): cosine of the two answers'
    # embeddings at or above this means equivalent; None: the judge module's calibrated constant.
    semantic_judge_threshold: float | None = None
    semantic_calibration: str = str(REPO_ROOT / "configs" / "semantic_calibration.json")
    semantic_threshold: float | None = None  # overrides the calibration file when set
    semantic_max_entries: int = Field(default=100_000, ge=1)
    semantic_max_bytes: int = Field(default=256 << 20, ge=1)
    semantic_tenant_max_entries: int = Field(default=50_000, ge=1)
    semantic_tenant_max_bytes: int = Field(default=128 << 20, ge=1)
    # Each SemanticCache replica's FAISS mirrors, all scopes together (least recently used scopes
    # are dropped first; they reload from Redis when used again). Bytes are an estimate of vectors,
    # texts and overhead, not RSS.
    semantic_mirror_max_entries: int = Field(default=100_000, ge=1)
    semantic_mirror_max_bytes: int = Field(default=384 << 20, ge=1)
    semantic_ttl_s: float = Field(default=86_400.0, gt=0)
    cache_nondeterministic: bool = False
    # Semantic mirrors in GPU memory when the SemanticCache replica has a GPU (configs/gpu.yaml);
    # falls back to the CPU through the same code path (caches/vector_index.py).
    semantic_faiss_gpu: bool = False
    encoder_timeout_s: float = Field(default=ENCODER_TIMEOUT_S, gt=0)
    semantic_timeout_s: float = Field(default=SEMANTIC_TIMEOUT_S, gt=0)
    embedding_ram_budget_bytes: int = 32 << 20
    embedding_ssd_budget_bytes: int = 256 << 20


class RecommenderSettings(_Settings):
    feast_repo: str = str(REPO_ROOT / "feature_store")
    ram_budget_bytes: int = 8 << 20
    ssd_budget_bytes: int = 64 << 20
    candidates: int = 200
    result_ttl_s: float = Field(default=600.0, gt=0)
    # Bounded memory: the recommendation results' own byte budget in Redis (oldest out first),
    # how long "Feast does not know this user" is remembered (so a flood of unknown ids stops
    # reaching Feast; an event of the user makes it stale at once), and the feature entries' TTL
    # in RAM and SSD. It runs from the entry's read from Feast: a promotion or demotion moves the
    # entry with the time it has left (caches/tiered_moves.py), so no row is served more than
    # feature_ttl_s after Feast gave it. That bounds a row whose invalidation was lost or never
    # sent (changed in Feast out of band); rows changed through events are kept current by the
    # generation check (caches/generations.py), not by this.
    result_max_bytes: int = Field(default=16 << 20, ge=1)
    result_tenant_max_bytes: int = Field(default=8 << 20, ge=1)
    unknown_user_ttl_s: float = Field(default=30.0, gt=0)
    feature_ttl_s: float = Field(default=3600.0, gt=0)
    # How often an idle replica looks for a model-version bump and due pending invalidations
    # (a request also checks the version, through ModelVersions' 0.5 s cache).
    watch_interval_s: float = 0.5
    # A request's personal answer must be ready within this (seconds), else the replica answers
    # the fallback list (popular items the user has not rated, `degraded: true`). Below the
    # Ingress's 10 s deadline, which can only answer 503.
    answer_within_s: float = Field(default=6.0, gt=0)
    # An event is applied or, past this (a slow Feast or Redis), queued on the replica's disk and
    # answered 202 `"recorded": "queued"` (deployments/recommender_events.py). Below the Ingress's
    # 10 s deadline for the call, whose 503 can only say "maybe recorded".
    event_within_s: float = Field(default=5.0, gt=0, le=8.0)
    # "feast-only" reads every feature straight from Feast (no RAM/SSD tiers): the baseline arm of
    # benchmarks/recommend_load.py, and a way to rule the tiers out when debugging.
    tiers: Literal["all", "feast-only"] = "all"
    # Off in benchmarks, so that repeated requests exercise the feature reads instead of one GET.
    result_cache: bool = True
    # The item index on the replica's GPU (caches.vector_index) when Ray gives it one
    # (ray_actor_options.num_gpus); without a visible GPU it stays on the CPU.
    faiss_gpu: bool = False
    # Tenants whose API keys may send `POST /v1/events` (the admin key always may). User ids are
    # the deployment's, not a tenant's: one user base and one catalogue, tenants are API clients,
    # so an event changes what every tenant is recommended for that user, and it is a write right
    # (docs/api.md). `default` is the tenant of every request when no API keys are configured (a
    # laptop on loopback, or `auth: off` behind your own gateway), so those setups keep working.
    event_tenants: list[str] = Field(default_factory=lambda: ["default"])


class AppSettings(_Settings):
    redis_url: str | None = None
    state_dir: str = str(REPO_ROOT / ".run")
    max_body_bytes: int = 256 * 1024
    api_keys: dict[str, str] = Field(default_factory=dict)  # key -> tenant; empty = auth off
    # Bearer keys with admin rights (also TIERSERVE_ADMIN_KEYS, comma-separated); none = no admin.
    admin_keys: list[str] = Field(default_factory=list)
    # "auto": with no api_keys, only loopback clients are answered (a laptop); "off": anyone is the
    # `default` tenant, deliberately (behind your own gateway). Never implied by a missing setting.
    # YAML 1.1 (what `serve run` and Serve configs parse with) reads a bare `auth: off` as false.
    auth: Annotated[Literal["auto", "off"], BeforeValidator(lambda v: "off" if v is False else v)] = "auto"
    # Tenant names as a label on exported metrics: opt-in (see deployments/metrics.py).
    metrics_tenant_labels: bool = False
    # The Serve application that answers `POST /v1/recommendations` itself, one hop from Serve's
    # proxy (deployments/recommender_http.py; the configs name it `recs`): the Ingress then binds
    # no Recommender and reaches that application's by name for events, stats and reloads. None:
    # the Ingress owns the Recommender and serves the route, two hops from the proxy, and a
    # Recommender replica that dies mid-request is asked again instead of being a 500 from the
    # proxy (docs/architecture.md weighs the two).
    recommendations_app: str | None = None
    llm: LLMSettings = Field(default_factory=LLMSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    recommender: RecommenderSettings = Field(default_factory=RecommenderSettings)

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> AppSettings:
        settings = cls.model_validate(args or {})
        env = os.environ
        if env.get("REDIS_URL"):
            settings.redis_url = env["REDIS_URL"]
        if env.get("TIERSERVE_FEAST_REPO"):
            settings.recommender.feast_repo = env["TIERSERVE_FEAST_REPO"]
        if env.get("TIERSERVE_STATE_DIR"):
            settings.state_dir = env["TIERSERVE_STATE_DIR"]
        if env.get("TIERSERVE_LLM_MODEL"):
            settings.llm.model = env["TIERSERVE_LLM_MODEL"]
        if env.get("TIERSERVE_ADMIN_KEYS"):
            settings.admin_keys = [k.strip() for k in env["TIERSERVE_ADMIN_KEYS"].split(",") if k.strip()]
        if env.get(API_KEYS_ENV):  # the Secret wins, as documented: a rotated or revoked key takes effect
            settings.api_keys = parse_keys(env[API_KEYS_ENV])
        return settings

    @property
    def redis(self) -> str:
        if not self.redis_url:
            raise RuntimeError(
                "No Redis configured: set REDIS_URL or `redis_url` in the Serve config args "
                "(`make run` starts an embedded one for you)."
            )
        return self.redis_url
