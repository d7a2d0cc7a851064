"""OpenAI-compatible HTTP server: `create_app(settings)`."""

from __future__ import annotations

from localroute.server.app import create_app

__all__ = ["create_app"]
