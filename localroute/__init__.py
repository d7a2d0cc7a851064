"""localroute: answer each query with the cheapest model that can answer it well.

Importing this package imports no inference engine: llama_cpp, torch and vllm are loaded lazily
inside the backends that need them.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
