"""The one set of secret shapes masked before text reaches a log or a client: the routing log's
opted-in prompt and answer text, and upstream error bodies (backends/openai_http.py `scrub`).

Heuristic: it catches well-known key shapes (provider API keys, cloud and chat tokens, JWTs,
bearer tokens, private keys, `password=...`), not every secret.
"""

from __future__ import annotations

import re

__all__ = ["mask_url", "redact", "strip_query_strings"]

_SECRET_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.DOTALL), "[redacted:private_key]"),
    (re.compile(r"\bsk-(?:ant-|proj-)?[A-Za-z0-9_\-]{16,}"), "[redacted:api_key]"),
    (re.compile(r"\bAKIA[0-9A-Z]{16}\b"), "[redacted:aws_key]"),
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"), "[redacted:github_token]"),
    (re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"), "[redacted:slack_token]"),
    (re.compile(r"\bAIza[0-9A-Za-z_\-]{35}\b"), "[redacted:google_key]"),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"), "[redacted:jwt]"),
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]+"), r"\1 [redacted]"),
    (re.compile(r"\b(?:sk|pk|rk|key)-[A-Za-z0-9_-]{8,}"), "[redacted:api_key]"),
    (re.compile(r"(?i)\b((?:ssl)?password|passwd|pwd|secret|api[_-]?key|access[_-]?token|auth[_-]?token)(\s*[:=]\s*)"
                r"(\"[^\"]*\"|'[^']*'|\S+)"), r"\1\2[redacted]"),
]

_QUERY = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#\"'<>]*)\?[^\s#\"'<>]*")


# Query-string parameters that carry a credential (libpq's `password`, `sslpassword`, and the
# same names as the patterns above): their values are masked by `mask_url`.
_SECRET_PARAM = re.compile(
    r"(?i)^(?:ssl)?(?:password|passwd|pwd|secret|api[_-]?key|access[_-]?token|auth[_-]?token|token|sslkey_?password)$"
)
_MASK = "**********"


def mask_url(url: str) -> str:
    """A connection URL fit to show: the user part's password and every credential-named query
    parameter (`?password=`, `&sslpassword=`, `api_key`...) replaced by asterisks; the rest kept."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    rest, hashmark, fragment = rest.partition("#")
    rest, qmark, query = rest.partition("?")
    if "@" in rest:
        user, host = rest.rsplit("@", 1)
        if ":" in user:
            rest = f"{user.split(':', 1)[0]}:{_MASK}@{host}"
    if qmark:
        parts = []
        for item in query.split("&"):
            name, eq, _ = item.partition("=")
            parts.append(f"{name}={_MASK}" if eq and _SECRET_PARAM.match(name) else item)
        query = "&".join(parts)
    return f"{scheme}://{rest}{qmark}{query}{hashmark}{fragment}"


def redact(text: str) -> str:
    """Mask obvious secrets, each replaced by a label that says what was there."""
    for pattern, repl in _SECRET_PATTERNS:
        text = pattern.sub(repl, text)
    return text


def strip_query_strings(text: str) -> str:
    """URLs lose their query string (where signed URLs and `?key=` carry credentials)."""
    return _QUERY.sub(r"\1?[redacted]", text)
