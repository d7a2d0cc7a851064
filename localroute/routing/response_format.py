"""Structured output: does an answer keep the requested `response_format`? A JSON-mode answer
that does not is never accepted from a cheap tier (the cascade escalates it, evidence
`schema_violations`), whatever its confidence."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["schema_violation"]


def schema_violation(response_format: dict[str, Any], text: str) -> str | None:
    """Why `text` breaks the requested format, or None when it complies (or no JSON was asked)."""
    kind = response_format.get("type")
    if kind not in ("json_object", "json_schema"):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"not valid JSON: {exc.msg} at char {exc.pos}"
    except RecursionError:  # an answer of a thousand nested brackets: not a 500
        return "JSON nests too deeply to check"
    if kind == "json_object":
        return None if isinstance(value, dict) else "JSON is not an object"
    schema = (response_format.get("json_schema") or {}).get("schema")
    if not isinstance(schema, dict):
        return None
    import jsonschema

    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        return f"schema violation at {where}: {exc.message[:200]}"
    except jsonschema.SchemaError as exc:
        return f"invalid schema: {exc.message[:200]}"
    except RecursionError:
        return "JSON nests too deeply to check"
    return None
