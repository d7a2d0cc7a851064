"""Routers: given a request, pick the tier that answers and say why."""

from __future__ import annotations

from localroute.routing.base import Decision, Routed, Router, Tier, TierAttempt
from localroute.routing.cascade import CascadeRouter

__all__ = ["CascadeRouter", "Decision", "Routed", "Router", "Tier", "TierAttempt"]
