"""OAuth 1.0a verification for the simulator (docs/protocol.md §5.4), built on oauthlib.

``OAuthVerifier.check()`` returns the credential identity on success and raises ``AuthError`` with a
plain-text reason (e.g. ``Timestamp out of bounds``) otherwise. oauthlib's
``SignatureOnlyEndpoint`` decides; our validator hooks record how far it got, which tells which
check failed without re-implementing any of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import string
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from oauthlib.oauth1 import (  # type: ignore[import-untyped]
    RequestValidator,
    SignatureOnlyEndpoint,
)

ENV_KEYS = (
    "TWITTER_CONSUMER_KEY",
    "TWITTER_CONSUMER_SECRET",
    "TWITTER_ACCESS_TOKEN",
    "TWITTER_ACCESS_TOKEN_SECRET",
)
_BAD_SIGNATURE = "Could not authenticate you: invalid signature"
_SAFE = frozenset(string.ascii_letters + string.digits + "-_")


class AuthError(Exception):
    """Why a request was refused (goes into the 401 body; never contains a secret)."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """One accepted set of app + user credentials. ``repr`` hides the secrets."""

    consumer_key: str
    consumer_secret: str = field(repr=False)
    access_token: str
    access_token_secret: str = field(repr=False)

    @property
    def identity(self) -> str:
        """Stable non-secret id of the credential (for the one-connection rule): a digest, since
        it is sent back in a disconnect's ``stream_name`` and lands in the client's spool."""
        account = f"{self.consumer_key}/{self.access_token.split('-', 1)[0]}"
        return hashlib.sha256(account.encode()).hexdigest()[:12]


def credentials_from_env(env: Mapping[str, str]) -> list[Credentials]:
    """The daemon's four environment variables, if all are set."""
    values = [env.get(key, "") for key in ENV_KEYS]
    if not all(values):
        return []
    return [Credentials(*values)]


def load_credentials_file(path: Path) -> list[Credentials]:
    """A YAML/JSON mapping with the four ``TWITTER_*`` keys, or a list of such mappings."""
    try:
        text = path.read_text(encoding="utf-8")
        data: Any = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read credentials: {type(exc).__name__}") from None
    entries = data if isinstance(data, list) else [data]
    result: list[Credentials] = []
    for index, entry in enumerate(entries):
        where = f"{path}: [{index}]" if isinstance(data, list) else f"{path}:"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} expected a mapping with keys {', '.join(ENV_KEYS)}")
        missing = [key for key in ENV_KEYS if not isinstance(entry.get(key), str) or not entry[key]]
        if missing:
            raise ValueError(f"{where} missing or empty: {', '.join(missing)}")
        result.append(Credentials(*(entry[key] for key in ENV_KEYS)))
    return result


def load_credentials(path: Path | None, env: Mapping[str, str] | None = None) -> list[Credentials]:
    """``--credentials FILE`` if given, else the environment; ``ValueError`` if neither."""
    creds = load_credentials_file(path) if path else credentials_from_env(env or os.environ)
    if not creds:
        missing = [key for key in ENV_KEYS if not (env or os.environ).get(key)]
        raise ValueError(f"no credentials: set {', '.join(missing)} or pass --credentials FILE")
    return creds


class _Validator(RequestValidator):  # type: ignore[misc]
    """Twitter-shaped keys and nonces, http:// on loopback, replay protection."""

    enforce_ssl = False
    dummy_client = "dummyclient"
    dummy_access_token = "dummytoken"
    safe_characters = _SAFE
    client_key_length = (1, 200)
    access_token_length = (1, 200)
    nonce_length = (1, 200)

    def __init__(self, creds: list[Credentials], window: float) -> None:
        super().__init__()
        self._window = window
        self._secrets = {c.consumer_key: c.consumer_secret for c in creds}
        self._tokens = {(c.consumer_key, c.access_token): c.access_token_secret for c in creds}
        self._nonces: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    @property
    def timestamp_lifetime(self) -> float:
        return self._window

    def get_client_secret(self, client_key: str, request: Any) -> str:
        return self._secrets.get(client_key, "dummy")

    def get_access_token_secret(self, client_key: str, token: str, request: Any) -> str:
        secret = self._tokens.get((client_key, token))
        if secret is None and getattr(request, "sim_failure", None) == _BAD_SIGNATURE:
            request.sim_failure = "Invalid or expired token"
        return secret or "dummy"

    def validate_client_key(self, client_key: str, request: Any) -> bool:
        ok = client_key in self._secrets
        if not ok:
            request.sim_failure = "Unknown consumer key"
        return ok

    def validate_timestamp_and_nonce(
        self, client_key: str, timestamp: str, nonce: str, request: Any, **_: Any
    ) -> bool:
        now = time.time()
        with self._lock:
            if len(self._nonces) > 10_000:  # forget nonces whose timestamps left the window
                horizon = now - 2 * self.timestamp_lifetime
                self._nonces = {k: t for k, t in self._nonces.items() if t > horizon}
            key = (client_key, nonce)
            if key in self._nonces:
                request.sim_failure = "Nonce already used"
                return False
            self._nonces[key] = now
        request.sim_failure = _BAD_SIGNATURE  # the only check left once the nonce passes
        return True


class OAuthVerifier:
    """Verify a request as the client signed it; ``check()`` returns the credential identity."""

    def __init__(self, creds: list[Credentials], timestamp_window: float = 600.0) -> None:
        self.window = timestamp_window
        self._validator = _Validator(creds, timestamp_window)
        self._endpoint = SignatureOnlyEndpoint(self._validator)
        self._identity = {(c.consumer_key, c.access_token): c.identity for c in creds}

    def check(self, uri: str, method: str, body: str, headers: Mapping[str, str]) -> str:
        if "oauth_signature" not in headers.get("Authorization", "") and "oauth_" not in uri:
            raise AuthError("Missing OAuth Authorization header")
        ok, request = self._endpoint.validate_request(uri, method, body, dict(headers))
        if ok and request.resource_owner_key is None:
            raise AuthError("Missing oauth_token: this endpoint needs user-context OAuth")
        if ok:
            return self._identity[(request.client_key, request.resource_owner_key)]
        if request is None:
            raise AuthError("Malformed or duplicated OAuth parameters")
        reason = getattr(request, "sim_failure", None)
        raise AuthError(reason or self._precheck_reason(request.timestamp))

    def _precheck_reason(self, timestamp: object) -> str:
        """oauthlib stopped before our hooks: explain clock skew precisely, else be generic."""
        if isinstance(timestamp, str) and timestamp.isdigit() and len(timestamp) == 10:
            skew = int(timestamp) - time.time()
            if abs(skew) > self.window:
                return (
                    f"Timestamp out of bounds: request timestamp {timestamp} differs from server "
                    f"time by {skew:+.0f} s (allowed {self.window:g} s)"
                )
        return "Missing or invalid OAuth parameters (timestamp, nonce, version or method)"
