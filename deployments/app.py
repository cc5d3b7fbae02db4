"""`build_app(args)`: the import path for `serve run` (see configs/local.yaml).

Deployments only wire resources: the chain is Ingress -> Encoder -> SemanticCache -> LLM for
chat and Ingress -> Recommender -> tiered feature cache for recommendations.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.config import AppSettings
from deployments.encoder import EncoderDeployment
from deployments.ingress import Ingress
from deployments.llm import LLMDeployment
from deployments.recommender import RecommenderDeployment
from deployments.semantic_cache import SemanticCacheDeployment


def build_app(args: dict[str, Any] | None = None) -> Application:
    settings = AppSettings.from_args(args)
    redis_url = settings.redis
    cache = settings.cache
    encoder = EncoderDeployment.bind(redis_url, settings.state_dir, cache.embedding_ram_budget_bytes, cache.embedding_ssd_budget_bytes)
    semantic = SemanticCacheDeployment.bind(redis_url, cache.model_dump())
    llm = LLMDeployment.bind(settings.llm.model_dump())
    recommender = RecommenderDeployment.bind(redis_url, settings.state_dir, settings.recommender.model_dump())
    return Ingress.bind(settings.model_dump(), encoder, semantic, llm, recommender)
