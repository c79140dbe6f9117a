"""Checks of `mongo.uri` by pymongo's own parser, without loading pymongo where it costs.

pymongo is ~19 MB of RSS that the supervisor and the stream worker otherwise never need: they call
check_mongo_uri_in_child() and, as long as they have not loaded pymongo, ask a short-lived child
interpreter instead. The URI goes over stdin (a command line is world-readable in /proc).
"""

from __future__ import annotations

import json
import sys
import warnings
from typing import Any
from urllib.parse import unquote

from ingestd.config.values import is_loopback
from ingestd.logs import MASK

# Options that turn off certificate/hostname/revocation checks (docs/reliability.md §3.3).
_INSECURE_TLS = {"tlsinsecure": "tlsInsecure", "tlsallowinvalidcertificates":
                 "tlsAllowInvalidCertificates", "tlsallowinvalidhostnames":
                 "tlsAllowInvalidHostnames", "tlsdisableocspendpointcheck":
                 "tlsDisableOCSPEndpointCheck"}


def _parse_mongo_uri(uri: str) -> dict[str, Any]:
    from pymongo.uri_parser import parse_uri

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymongo warnings may quote option values
        if uri.startswith("mongodb+srv://"):
            # parse_uri would resolve SRV/TXT records: validate syntax only, no DNS at load.
            # _validate_uri is private; if a pymongo release drops it, skip the check.
            try:
                from pymongo.uri_parser_shared import _validate_uri
            except ImportError:
                return {"options": {}, "nodelist": []}
            return _validate_uri(uri)
        return parse_uri(uri)


def pymongo_uri_facts(uri: str) -> dict[str, Any]:
    """pymongo's verdict on ``uri`` as plain JSON: ``{"error": reason}`` (not yet scrubbed), or
    ``{"true_options": [lower-cased names of options set to true], "hosts": [...]}``."""
    from pymongo.errors import PyMongoError

    try:
        parsed = _parse_mongo_uri(uri)
        _build_client(uri)
    except (PyMongoError, ValueError, TypeError, OSError) as exc:
        return {"error": str(exc)}
    options = parsed["options"].items()
    return {"true_options": sorted(str(k).lower() for k, v in options if v is True),
            "hosts": [str(host) for host, _port in parsed["nodelist"]]}


def _build_client(uri: str) -> None:
    """Build (and close) a client as the store worker will, without connecting: what only a
    client finds is found here, at load (a ``tlsCAFile`` that cannot be read, a key file's wrong
    password), and refused like any bad setting instead of crashing the worker at start."""
    import pymongo

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pymongo.MongoClient(uri, connect=False).close()


_uri_check_in_child = False  # set by check_mongo_uri_in_child()
_URI_CHILD = ("import json, sys\n"
              "from ingestd.config.mongo_uri import pymongo_uri_facts\n"
              "sys.stdout.write(json.dumps(pymongo_uri_facts(sys.stdin.read())))\n")
_URI_CHILD_TIMEOUT = 60.0
# The last verdict: a reload that keeps the URI spawns no child. One entry only, so an old
# password does not outlive the next URI change.
_last_uri_facts: tuple[str, dict[str, Any]] | None = None


def check_mongo_uri_in_child() -> None:
    """From now on, check ``mongo.uri`` in a child interpreter unless pymongo is loaded here.

    For the long-lived processes that never talk to MongoDB (supervisor, stream worker); the
    child costs ~0.3 s of CPU per new URI, so one-shot tools keep the in-process default.
    """
    global _uri_check_in_child
    _uri_check_in_child = True


def mongo_uri_facts(uri: str) -> dict[str, Any]:
    """``pymongo_uri_facts(uri)``, from a child interpreter if this process asked for that."""
    global _last_uri_facts
    if _last_uri_facts is not None and _last_uri_facts[0] == uri:
        return _last_uri_facts[1]
    in_child = _uri_check_in_child and "pymongo" not in sys.modules
    facts = _uri_facts_in_child(uri) if in_child else pymongo_uri_facts(uri)
    _last_uri_facts = (uri, facts)
    return facts


def _uri_facts_in_child(uri: str) -> dict[str, Any]:
    import subprocess

    try:
        done = subprocess.run([sys.executable, "-c", _URI_CHILD], input=uri.encode(),
                              capture_output=True, timeout=_URI_CHILD_TIMEOUT, check=True)
        facts = json.loads(done.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        facts = None
    if not isinstance(facts, dict):
        # No usable child (no fork, killed, broken interpreter): pay the import, never guess.
        return pymongo_uri_facts(uri)
    return facts


def uri_problems(uri: str) -> list[str]:
    """What is wrong with ``uri`` (no secret in any reason); empty when it is acceptable."""
    facts = mongo_uri_facts(uri)
    if "error" in facts:
        reason = str(facts["error"])
        for secret in (uri_password(uri), _uri_userinfo(uri)):
            if secret:
                reason = reason.replace(secret, MASK).replace(unquote(secret), MASK)
        return [f"invalid MongoDB URI: {reason}"]
    true_options = set(facts.get("true_options", ()))
    insecure = [name for key, name in _INSECURE_TLS.items() if key in true_options]
    hosts = [str(host) for host in facts.get("hosts", ())]
    # A mongodb+srv name is not a host: DNS names the hosts, which may be anywhere.
    srv = uri.startswith("mongodb+srv://")
    if insecure and (srv or not all(is_loopback(h) for h in hosts)):
        # pymongo sets every implied option (tlsInsecure=true sets the other three): name only
        # those written in the URI.
        written = _option_names(uri)
        named = [name for name in insecure if name.lower() in written] or insecure
        which = f"URI option {named[0]} turns" if len(named) == 1 else \
            f"URI options {', '.join(named)} turn"
        return [f"{which} off TLS certificate checks; allowed only when every host is loopback"]
    return []


def _option_names(uri: str) -> set[str]:
    """The lower-cased names of the options written in ``uri``'s query string."""
    query = uri.partition("?")[2].partition("#")[0]
    return {part.partition("=")[0].strip().lower() for part in query.replace(";", "&").split("&")}


def _uri_userinfo(uri: str) -> str:
    authority = uri.partition("://")[2].split("/", 1)[0].split("?", 1)[0]
    return authority.rpartition("@")[0]


def uri_password(uri: str) -> str:
    """The password part of ``uri`` as written (percent-encoded); "" when there is none."""
    return _uri_userinfo(uri).partition(":")[2]
