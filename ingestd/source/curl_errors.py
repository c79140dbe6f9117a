"""libcurl's error numbers said as what to do: the daemon's reason for a failed connection and
``ingestd check``'s (a module of its own, so that ``check`` loads no connection machinery)."""

from __future__ import annotations

# libcurl's TLS errors, said as what to do about them (the daemon's reason and ``check``'s).
TLS_ERRORS = {
    35: "the TLS handshake failed",
    51: "the server's certificate does not match its host name",
    58: "the client certificate could not be used",
    60: "the server's TLS certificate is not signed by a trusted CA (self-signed, or issued "
        "by a private CA: set stream.ca_file to that CA's certificate bundle)",
    77: "the CA bundle could not be read (check stream.ca_file)",
}


def curl_error_text(errno: int | None, errmsg: str) -> str:
    """libcurl's message for a failed transfer, with what to do if it is a TLS error."""
    hint = TLS_ERRORS.get(errno) if errno is not None else None
    return f"{errmsg}: {hint} (curl error {errno})" if hint else errmsg
