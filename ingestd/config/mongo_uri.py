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
from urllib.parse import unquote, unquote_plus

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
    try:
        parsed = _parse_mongo_uri(uri)
        _build_client(uri)
    except Exception as exc:  # pymongo's validators raise more than its own errors (a
        # KeyError for datetime_conversion): every one is a verdict on the URI.
        return {"error": _refusal(uri, exc)}
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


# Options whose value is a secret (a key file's password; AWS_SESSION_TOKEN): never quoted.
_SECRET_OPTIONS = frozenset({"tlscertificatekeyfilepassword", "sslpemkeypassword",
                             "authmechanismproperties"})
_QUOTED_VALUE_MAX = 40


def _refusal(uri: str, exc: Exception) -> str:
    """pymongo's reason, led by the option it refused (``option w=x: …``) when one option alone
    is to blame."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    culprit = _refused_option(uri)
    return f"option {culprit}: {text}" if culprit else text


def _refused_option(uri: str) -> str:
    """``name=value`` of the first option pymongo refuses on its own ("" if none does).

    Only options pymongo knows are named (an unknown one may be pasted credential text, as
    pymongo itself assumes), and no value where the query holds an ``@``: a password written
    with a raw ``/`` or ``?`` spills its tail into the query."""
    from pymongo.common import URI_OPTIONS_VALIDATOR_MAP
    from pymongo.uri_parser import split_options

    query = uri.partition("?")[2]
    for pair in query.split(";" if ";" in query else "&"):
        name, _, value = pair.partition("=")
        if pair.count("=") != 1 or name.lower() not in URI_OPTIONS_VALIDATOR_MAP:
            continue  # not one option as pymongo reads them: its own reason says enough
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                split_options(pair)
        except Exception:  # any refusal, whatever its type, names this option
            return f"{name}={_quoted_value(name, value, query)}"
    return ""


def _quoted_value(name: str, value: str, query: str) -> str:
    if name.lower() in _SECRET_OPTIONS or "@" in query:
        return MASK
    value = unquote_plus(value)
    return value if len(value) <= _QUOTED_VALUE_MAX else value[:_QUOTED_VALUE_MAX] + "…"


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
                for form in (secret, unquote(secret), unquote_plus(secret)):
                    reason = reason.replace(form, MASK)
        return [f"invalid MongoDB URI: {reason}"]
    true_options = set(facts.get("true_options", ()))
    insecure = [name for key, name in _INSECURE_TLS.items() if key in true_options]
    if insecure and not _stays_on_loopback(uri, facts):
        return [_insecure_refusal(uri, insecure, facts)]
    return []


def _stays_on_loopback(uri: str, facts: dict[str, Any]) -> bool:
    """Does the client only ever connect to loopback? Every seed must be loopback, and discovery
    must not add members: a seed's ``hello`` may name replica-set members anywhere, and pymongo
    connects to them with the same TLS options. ``directConnection=true`` (one host, no
    discovery) or ``loadBalanced=true`` (one host, the balancer) keeps it on the seed. A
    mongodb+srv name is not a host: DNS names the hosts."""
    hosts = [str(host) for host in facts.get("hosts", ())]
    pinned = {"directconnection", "loadbalanced"} & set(facts.get("true_options", ()))
    return (not uri.startswith("mongodb+srv://") and bool(pinned) and bool(hosts)
            and all(is_loopback(h) for h in hosts))


def _insecure_refusal(uri: str, insecure: list[str], facts: dict[str, Any]) -> str:
    # pymongo sets every implied option (tlsInsecure=true sets the other three): name only
    # those written in the URI.
    written = _option_names(uri)
    named = [name for name in insecure if name.lower() in written] or insecure
    which = f"URI option {named[0]} turns" if len(named) == 1 else \
        f"URI options {', '.join(named)} turn"
    reason = (f"{which} off TLS certificate checks; allowed only for one loopback host with "
              "directConnection=true")
    hosts = [str(host) for host in facts.get("hosts", ())]
    if uri.startswith("mongodb+srv://") or not all(is_loopback(h) for h in hosts):
        return reason
    fix = "add directConnection=true" if len(hosts) == 1 else \
        "list one loopback host and add directConnection=true"
    return (f"{reason}: {fix} (without it the client also connects, checks off, to every "
            "replica-set member the host names, wherever they are)")


def _option_names(uri: str) -> set[str]:
    """The lower-cased names of the options written in ``uri``'s query string."""
    query = uri.partition("?")[2].partition("#")[0]
    return {part.partition("=")[0].strip().lower() for part in query.replace(";", "&").split("&")}


def _userinfo_span(uri: str) -> tuple[int, int]:
    """[start, end) of ``uri``'s user name and password, split as pymongo splits it: the host
    part ends at the first "/" or "?", the user information at its last "@" (so it may hold
    "#", spaces, ":" or "@"); (0, 0) when there is none."""
    scheme_end = uri.find("://")
    if scheme_end < 0:
        return 0, 0
    start = scheme_end + 3
    host_end = min((i for i in (uri.find("/", start), uri.find("?", start)) if i >= 0),
                   default=len(uri))
    at = uri.rfind("@", start, host_end)
    return (start, at) if at >= 0 else (0, 0)


def _uri_userinfo(uri: str) -> str:
    start, end = _userinfo_span(uri)
    return uri[start:end]


def mask_userinfo(uri: str) -> str:
    """``uri`` with whatever pymongo takes as its user name and password replaced by ``***``."""
    start, end = _userinfo_span(uri)
    return f"{uri[:start]}{MASK}{uri[end:]}" if end else uri


def uri_password(uri: str) -> str:
    """The password part of ``uri`` as written (percent-encoded); "" when there is none."""
    return _uri_userinfo(uri).partition(":")[2]
