"""Optional API keys, checked at the ASGI edge before any route (or body) is touched.

Keys come from `settings.api_keys` (comma-separated, e.g. LOCALROUTE_API_KEYS) and/or
`settings.api_keys_file` (one per line, raw or as `sha256:<hex>` so the file need not hold them
in clear). Only SHA-256 digests are kept in memory; a presented key is hashed and compared with
`hmac.compare_digest` against every stored digest, without stopping at the first match, so the
time taken says nothing about which key or how much of it matched. Keys are never logged: a
request is identified downstream (per-key budgets) by `key_id`, a short digest prefix.

Every path needs a key except `/health` and the configured `public_paths` (`/metrics` and admin
routes are protected unless listed there). A missing or wrong key gets an OpenAI-shaped 401.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localroute.backends.budget import current_key_id
from localroute.errors import AuthenticationError, ConfigError
from localroute.server.errors import api_for_path, error_response

if TYPE_CHECKING:
    from localroute.settings import Settings

__all__ = ["ApiKeyStore", "AuthMiddleware", "current_key_id", "key_id_of"]

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ALWAYS_PUBLIC = frozenset({"/health"})


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def key_id_of(digest: bytes) -> str:
    """A non-secret name for a key: the first 12 hex digits of its SHA-256."""
    return digest.hex()[:12]


class ApiKeyStore:
    """SHA-256 digests of the accepted keys."""

    def __init__(self, digests: Iterable[bytes]) -> None:
        self._digests = tuple(dict.fromkeys(digests))

    def __len__(self) -> int:
        return len(self._digests)

    @classmethod
    def from_keys(cls, keys: Iterable[str]) -> ApiKeyStore:
        return cls(_digest(k) for k in keys if k)

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiKeyStore | None:
        """None when no keys are configured (auth off). A bad key file is a ConfigError."""
        digests: list[bytes] = []
        if settings.api_keys is not None:
            digests += [_digest(k.strip()) for k in settings.api_keys.get_secret_value().split(",") if k.strip()]
        if settings.api_keys_file is not None:
            digests += _read_key_file(settings.api_keys_file)
        if not digests:
            if settings.api_keys is not None or settings.api_keys_file is not None:
                raise ConfigError("api_keys: no keys configured (empty value or file)", param="api_keys")
            return None
        return cls(digests)

    def verify(self, presented: str | None) -> str | None:
        """The key id if `presented` is an accepted key, else None; constant-time per stored key."""
        if not presented:
            return None
        candidate = _digest(presented)
        match: bytes | None = None
        for digest in self._digests:  # no early exit
            if hmac.compare_digest(candidate, digest):
                match = digest
        return key_id_of(match) if match is not None else None


def _read_key_file(path: Path) -> list[bytes]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"api_keys_file: cannot read {path}: {type(exc).__name__}", param="api_keys_file") from None
    digests = []
    for n, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("sha256:"):
            try:
                raw = bytes.fromhex(line[7:])
            except ValueError:
                raw = b""
            if len(raw) != 32:
                raise ConfigError(f"api_keys_file: line {n} is not a sha256:<64 hex digits> digest",
                                  param="api_keys_file")
            digests.append(raw)
        else:
            digests.append(_digest(line))
    return digests


def _presented_key(scope: Scope) -> str | None:
    headers: dict[str, str] = {
        k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or ()
    }
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return headers.get("api-key") or headers.get("x-api-key") or None


def _unauthorized(presented: bool) -> AuthenticationError:
    return AuthenticationError("Incorrect API key provided." if presented else
                               "You didn't provide an API key. Send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'.")


class AuthMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware) so it costs one dict lookup and a hash per request and
    sets `current_key_id` in the very context the route runs in."""

    def __init__(self, app: ASGIApp, keys: ApiKeyStore, public_paths: Iterable[str] = ()) -> None:
        self.app = app
        self.keys = keys
        self.public = ALWAYS_PUBLIC | frozenset(public_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path", "") in self.public:
            await self.app(scope, receive, send)
            return
        presented = _presented_key(scope)
        key_id = self.keys.verify(presented)
        if key_id is None:
            log.info("rejected %s %s: %s API key", scope.get("method"), scope.get("path"),
                     "wrong" if presented else "no")
            api = api_for_path(scope.get("path", ""))
            await error_response(_unauthorized(presented is not None), api)(scope, receive, send)
            return
        token = current_key_id.set(key_id)
        try:
            await self.app(scope, receive, send)
        finally:
            current_key_id.reset(token)
