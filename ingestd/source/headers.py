"""HTTP headers: the User-Agent every request sends, and response header lines as libcurl's
HEADERFUNCTION delivers them, one line per call."""

from __future__ import annotations

from ingestd import __version__

USER_AGENT = f"ingestd/{__version__}"


def parse_header_line(line: bytes, headers: dict[str, str]) -> int | None:
    """Record one header line into ``headers`` (lower-cased names).

    Returns the status code for a status line (which also clears ``headers``: after a redirect
    or a ``100 Continue`` a new response starts), else None.
    """
    text = line.decode("latin-1").strip()
    if text.startswith("HTTP/"):
        parts = text.split(" ", 2)
        headers.clear()
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    if ":" in text:
        name, _, value = text.partition(":")
        headers[name.strip().lower()] = value.strip()
    return None
