"""The ``ha`` section: standby pairs and redundant streams (schema: ``HaSettings``)."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

from ingestd.config.schema import AuthSettings, HaSettings
from ingestd.config.section import Section

MODES = ("single", "standby", "redundant")
MIN_LEASE = 1.0  # below this a renewal every lease_seconds/5 is faster than a MongoDB round trip


def build_ha(sec: Section, state_dir: Path, auth: AuthSettings, api: str) -> HaSettings:
    mode = sec.text("mode", choices=MODES)
    if mode == "standby" and api == "v2":
        # A frozen or cut-off holder's v2 connection still counts against the app's limit: the
        # new holder is refused (429 TooManyConnections) and backs off for a minute or more,
        # instead of taking over within lease_seconds (docs/protocol.md §7.4).
        sec.error("mode", "standby is for stream.api v1.1, where a new connection logs the old "
                          "one out; v2 refuses it (429 TooManyConnections) while the old "
                          "holder's connection lingers, so a takeover waits a minute or more: "
                          "use ha.mode: redundant (v2 redundant connections) or single")
    lease = sec.number("lease_seconds", lo=MIN_LEASE, hi=3600)
    instance = sec.text("instance", default="") or default_instance(state_dir)
    lease_key = sec.text("lease_key", default="") or default_lease_key(auth)
    collection = sec.text("collection")
    if not collection or "$" in collection or "\0" in collection:
        sec.error("collection", f"must be a MongoDB collection name, got {collection!r}")
    return HaSettings(mode=mode, lease_seconds=lease, instance=instance, collection=collection,
                      lease_key=lease_key)


def default_instance(state_dir: Path) -> str:
    """Stable across restarts (same host, same state folder), distinct between the instances
    of one host: each has its own state folder."""
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]
    return f"{socket.gethostname()}:{digest}"


def default_lease_key(auth: AuthSettings) -> str:
    """One lease per account: the endpoint limits connections per credentials. Only a short
    hash of the public halves (consumer key, access token; the bearer token for v2) is used, so
    the lease document reveals no secret."""
    public = (auth.consumer_key.reveal(), auth.access_token.reveal(), auth.bearer_token.reveal())
    return "stream:" + hashlib.sha256("\n".join(public).encode()).hexdigest()[:16]
