from caches.tiers.base import Tier, TierStats, TierUnavailable

__all__ = ["Tier", "TierStats", "TierUnavailable"]
