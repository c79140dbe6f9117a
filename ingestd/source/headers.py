"""HTTP headers: the User-Agent every request sends, and response header lines as libcurl's
HEADERFUNCTION delivers them, one line per call."""

from __future__ import annotations

import re

from ingestd import __version__

USER_AGENT = f"ingestd/{__version__}"
# The reason a connection ends with when libcurl refuses a line of its response head (a broken
# proxy's junk): also the ending's name, counted in ingestd_stream_reconnects_total.
MALFORMED_HEADER = "malformed_response_header"
# Bytes of a refused line shown in the reason: enough to recognise it, never its value (a line
# that echoes a request header could carry a token), escaped as Python shows bytes.
SHOWN_BYTES = 32
# RFC 9110 §5.1: a field name is a token; RFC 9110 §5.5: a value holds no control character but
# HTAB (obs-text, bytes 0x80-0xFF, is allowed). libcurl refuses only a line without a colon or
# with a NUL; the rest it passes are skipped (``ResponseHead``).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
CURLE_WEIRD_SERVER_REPLY = 8  # libcurl's error for a response head it cannot read
IGNORED_SHOWN = 3  # skipped lines kept per response head for the log (a junk head may be long)


class MalformedHeader(ValueError):
    """A response header line that is no header line: its message is the reason's detail."""


class ResponseHead:
    """A response's status and headers as libcurl hands its header lines over (one per call).

    ``take`` is the HEADERFUNCTION: it must not raise (pycurl would log a traceback and libcurl
    end the transfer with a bare "Failure writing output" error 23). A line that is no header
    line (a broken proxy's junk) is skipped, not refused: the few headers read (status, encoding,
    rate limits, date) are still read, and a working stream is not reconnected for ever over a
    line it does not need. ``ignored`` says which lines were skipped (the caller logs it). A line
    libcurl itself refuses (no colon, a NUL) ends the transfer before it reaches ``take``:
    ``refused_by_curl`` gives that ending its reason."""

    def __init__(self, headers: dict[str, str] | None = None) -> None:
        self.headers: dict[str, str] = {} if headers is None else headers
        self.status = 0
        self.lines = 0  # lines of the current head taken; 0: a status line may come next
        self.ignored: list[str] = []  # the first IGNORED_SHOWN lines skipped, as shown

    def take(self, line: bytes) -> None:
        try:
            status = parse_header_line(line, self.headers, at_start=self.lines == 0)
        except MalformedHeader as exc:
            if len(self.ignored) < IGNORED_SHOWN:
                self.ignored.append(f"header line {self.lines + 1} {exc}")
            status = None
        self.lines = self.lines + 1 if line.rstrip(b"\r\n") else 0  # a blank line ends a head
        if status is not None:
            self.status = status

    @property
    def in_head(self) -> bool:
        """No complete head yet: a status line is awaited, or the head's lines are coming."""
        return self.status == 0 or self.lines > 0

    def refused_by_curl(self, errno: int | None, errmsg: str) -> str:
        """The reason for a transfer libcurl ended while reading the head: a line it refused
        (CURLE_WEIRD_SERVER_REPLY: "Header without colon", "NUL byte in header"…) never reaches
        HEADERFUNCTION, so only its place is known. "" for any other ending."""
        if errno != CURLE_WEIRD_SERVER_REPLY or not self.in_head:
            return ""
        where = "the status line" if self.status == 0 else f"header line {self.lines + 1}"
        return f"{MALFORMED_HEADER}: {where} refused by libcurl: {errmsg} (curl error {errno})"


def parse_header_line(line: bytes, headers: dict[str, str], *, at_start: bool) -> int | None:
    """Record one header line into ``headers`` (lower-cased names).

    ``at_start``: the line is the first of a response head (the first line, or the first after
    a head's blank line), the only place a status line may be. Returns the status code for a
    status line (which also clears ``headers``: after a redirect or a ``100 Continue`` a new
    response starts), else None. Raises ``MalformedHeader`` for a line that is neither (a status
    line inside a head included: it is no new response).
    """
    text = line.decode("latin-1").rstrip("\r\n")
    if not text:
        return None  # the head's end
    if at_start and text.startswith("HTTP/"):  # libcurl checked its form; its code may be junk
        parts = text.split(" ", 2)
        headers.clear()
        code = parts[1] if len(parts) > 1 else ""
        return int(code) if code.isascii() and code.isdigit() else 0
    if text[0] in " \t":
        return None  # obs-fold (RFC 9112 §5.2): a value continued; none we read is folded
    name, colon, value = text.partition(":")
    name = name.rstrip(" \t")  # "Name : value" is tolerated, as before
    if not colon or not _TOKEN.fullmatch(name):
        raise MalformedHeader(f"{shown_line(line)} (its field name is not a token)")
    if _CONTROL.search(value):
        raise MalformedHeader(f"{shown_line(line)} (a control character in its value)")
    headers[name.lower()] = value.strip(" \t")
    return None


def shown_line(line: bytes) -> str:
    """A refused line as the reason shows it: up to its colon (never its value), at most
    ``SHOWN_BYTES``, escaped (``\\xNN``), quoted."""
    head = line.rstrip(b"\r\n")
    name, colon, _ = head.partition(b":")
    cut = name[:SHOWN_BYTES]
    more = "…" if len(name) > SHOWN_BYTES else ""
    value = ": (value not shown)" if colon else ""
    return f'"{str(cut)[2:-1]}{more}"{value}'
