"""Backends: one module per engine, each imported lazily by `load_backend`."""

from __future__ import annotations

from localroute.backends.base import Backend, load_backend

__all__ = ["Backend", "load_backend"]
