"""The import paths for `serve run` (see configs/local.yaml): `build_app` and `build_recs_app`.

Deployments only wire resources: the chain is Ingress -> Encoder -> SemanticCache -> LLM for
chat, and for recommendations either Serve's proxy -> Recommender (its own application, `recs`
at `/v1/recommendations`, when `recommendations_app` names it: one hop) or Ingress -> Recommender
(when it is null: two hops). The Recommender reads features through the tiered feature cache.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.config import AppSettings
from deployments.encoder import EncoderDeployment
from deployments.ingress import Ingress
from deployments.llm import LLMDeployment
from deployments.recommender import RecommenderDeployment
from deployments.recommender_http import RECS_ROUTE_PREFIX, RecommenderHTTP
from deployments.semantic_cache import SemanticCacheDeployment

__all__ = ["RECS_ROUTE_PREFIX", "build_app", "build_recs_app"]


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The Ingress and the chat deployments; the Recommender too unless `recommendations_app`
    names the application that holds it (deploy `build_recs_app` under that name)."""
    settings = AppSettings.from_args(args)
    redis_url = settings.redis
    cache = settings.cache
    encoder = EncoderDeployment.bind(redis_url, settings.state_dir, cache.embedding_ram_budget_bytes, cache.embedding_ssd_budget_bytes)
    semantic = SemanticCacheDeployment.bind(redis_url, cache.model_dump())
    llm = LLMDeployment.bind(settings.llm.model_dump())
    if settings.recommendations_app is not None:
        return Ingress.bind(settings.model_dump(), encoder, semantic, llm)
    recommender = RecommenderDeployment.bind(redis_url, settings.state_dir, settings.recommender.model_dump())
    return Ingress.bind(settings.model_dump(), encoder, semantic, llm, recommender)


def build_recs_app(args: dict[str, Any] | None = None) -> Application:
    """The Recommender answering `POST /v1/recommendations` itself: deploy it at
    `RECS_ROUTE_PREFIX`, named as the Ingress's `recommendations_app` says."""
    settings = AppSettings.from_args(args)
    settings.redis  # noqa: B018 - fail at build time, with the message, when no Redis is configured
    if settings.recommendations_app is None:
        # The Ingress would then own a Recommender fleet of its own, and events sent through it
        # would reach other replicas than the recommendations: one fleet, named in both.
        raise ValueError("`recommendations_app` is null, so the Ingress serves the recommendations itself: "
                         "drop this application from the config, or set `recommendations_app` to its name")
    return RecommenderHTTP.bind(settings.model_dump())
