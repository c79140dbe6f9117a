"""A failed TLS certificate check said as its cause and the setting that fixes it.

libcurl reports every failed verification as one error number (60) and Python's ssl as one
exception (CERTIFICATE_VERIFY_FAILED); only OpenSSL's reason in the message tells an expired
certificate from a wrong host name or a private CA, and each has another fix: a CA bundle cannot
help an expired certificate. Shared by the stream (libcurl), the store (pymongo) and ``check``.

    certificate_problem(errmsg, TRUST_STREAM, HOST_STREAM, verify_failed=True)
"""

from __future__ import annotations

# The settings each side's causes name: where the trusted CAs come from, and the host checked.
TRUST_STREAM = "stream.ca_file"
HOST_STREAM = "stream.url"
TRUST_MONGO = "tlsCAFile in mongo.uri"
HOST_MONGO = "mongo.uri"

# (OpenSSL's or libcurl's words, lower-cased) -> the cause; {trust} and {host} name the settings.
_CAUSES = (
    (("certificate has expired",),
     "the server's TLS certificate has expired: it must be renewed on the server (or this "
     "host's clock is wrong); {trust} cannot help"),
    (("certificate is not yet valid",),
     "the server's TLS certificate is not valid yet: check this host's clock (or the server "
     "installed a certificate dated ahead); {trust} cannot help"),
    (("no alternative certificate subject name", "subject name does not match",
      "does not match target host", "hostname mismatch", "ip address mismatch"),
     "the server's TLS certificate is for another host name: {host} must name a host the "
     "certificate covers"),
    (("self-signed certificate", "self signed certificate"),
     "the server's TLS certificate is not signed by a trusted CA (self-signed, or issued by a "
     "private CA: set {trust} to that CA's certificate bundle)"),
    (("unable to get local issuer certificate", "unable to verify the first certificate"),
     "the server's TLS certificate chain does not reach a trusted CA: the server does not send "
     "its intermediate certificate (fix it there), or it is issued by a private CA (set {trust} "
     "to that CA's certificate bundle)"),
    (("certificate revoked",),
     "the server's TLS certificate has been revoked: it must be replaced on the server"),
)
_UNKNOWN = ("the server's TLS certificate could not be verified (if it is issued by a private "
            "CA: set {trust} to that CA's certificate bundle)")


def certificate_problem(message: str, trust: str, host: str, *, verify_failed: bool) -> str | None:
    """The cause of a failed certificate check that ``message`` reports, naming the setting to
    change; None if it reports none. ``verify_failed``: the caller knows a check failed (libcurl's
    error 60), so an unrecognised reason still gets the generic cause."""
    text = message.lower()
    for needles, cause in _CAUSES:
        if any(n in text for n in needles):
            return cause.format(trust=trust, host=host)
    if verify_failed or "certificate verify failed" in text:
        return _UNKNOWN.format(trust=trust, host=host)
    return None
