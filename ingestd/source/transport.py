"""What every libcurl handle to the endpoint shares, set in one place: TLS always verified, and
no proxy for a loopback endpoint.

libcurl takes a proxy from the environment (``http_proxy``, ``HTTPS_PROXY``, ``ALL_PROXY``,
minus ``NO_PROXY``). For an https endpoint that is kept: TLS runs end to end through the proxy's
``CONNECT`` tunnel, and operators behind a corporate proxy need it. A loopback endpoint may be
plain http (settings allow it for loopback only), and through a proxy that is the signed request
in clear text off the host: a loopback endpoint is never reached through a proxy.

    configure_transport(curl, stream.url, ca_bundle(stream))
"""

from __future__ import annotations

import contextlib
from urllib.parse import urlsplit

import pycurl

from ingestd.config.values import is_loopback

# CURLOPT_CA_CACHE_TIMEOUT (libcurl >= 7.87; pycurl names no constant for it). libcurl keeps the
# CA store it built from a bundle for 24 hours per multi handle, keyed by the file's name: a
# stream.ca_file replaced in place (a CA rotation) went unread by every reconnect, and no reload
# could make it read. 0: each connection reads the bundle (~5 ms for certifi's, per connection).
CA_CACHE_TIMEOUT = 321


def configure_transport(curl: pycurl.Curl, url: str, ca_file: str) -> None:
    """TLS verification against ``ca_file`` and the proxy policy for a request to ``url``."""
    # Settings refuse plain http:// for anything but loopback.
    curl.setopt(pycurl.CAINFO, ca_file)
    _no_ca_cache(curl)
    curl.setopt(pycurl.SSL_VERIFYPEER, 1)
    curl.setopt(pycurl.SSL_VERIFYHOST, 2)
    if uses_no_proxy(url):
        curl.setopt(pycurl.NOPROXY, "*")  # "*": no host goes through the environment's proxy


def _no_ca_cache(curl: pycurl.Curl) -> None:
    """Every connection reads the CA bundle as the file is now (``CA_CACHE_TIMEOUT``)."""
    with contextlib.suppress(pycurl.error):  # a libcurl before 7.87 has no cache to turn off
        curl.setopt(CA_CACHE_TIMEOUT, 0)


def uses_no_proxy(url: str) -> bool:
    """A loopback endpoint is reached directly, whatever the proxy environment says."""
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return False  # not a URL settings accept; libcurl will refuse it
    return host is not None and is_loopback(host)
