"""libcurl's error numbers said as what to do: the daemon's reason for a failed connection and
``ingestd check``'s (a module of its own, so that ``check`` loads no connection machinery)."""

from __future__ import annotations

from ingestd.config.tls import HOST_STREAM, TRUST_STREAM, certificate_problem

# libcurl's TLS errors, said as what to do about them (the daemon's reason and ``check``'s).
# 60 (and 51, its number before libcurl 7.62) is any failed certificate check: its message's
# OpenSSL reason tells which (``config.tls``).
CERTIFICATE_ERRORS = frozenset({51, 60})
# The server's certificate could not be trusted, or the bundle to trust it by not read: counted
# as ``tls_certificate``, not ``network`` (``response.classify``).
TRUST_ERRORS = CERTIFICATE_ERRORS | {77}
TLS_ERRORS = {
    35: "the TLS handshake failed",
    58: "the client certificate could not be used",
    77: "the CA bundle could not be read (check stream.ca_file)",
}


def tls_hint(errno: int | None, errmsg: str) -> str | None:
    """What to do about libcurl error ``errno``, if it is a TLS one: for a failed certificate
    check the cause OpenSSL gave in ``errmsg`` (expired, wrong host, no trusted CA…)."""
    if errno in CERTIFICATE_ERRORS:
        return certificate_problem(errmsg, TRUST_STREAM, HOST_STREAM, verify_failed=True)
    return TLS_ERRORS.get(errno) if errno is not None else None


def curl_error_text(errno: int | None, errmsg: str) -> str:
    """libcurl's message for a failed transfer, with what to do if it is a TLS error."""
    hint = tls_hint(errno, errmsg)
    return f"{errmsg}: {hint} (curl error {errno})" if hint else errmsg
