"""Throwaway certificates (the openssl CLI) and a TLS-terminating front for tests.

    certs = make_certs(tmp_path)          # a CA, an intermediate, leaves: good, expired, ...
    with TlsFront(certs.chain("good"), certs.key("good"), upstream=("127.0.0.1", port)) as front:
        ...  # front.port: TLS here, plain TCP to upstream (None: answers 503 itself)

Leaves are issued by the intermediate; ``chain(name)`` is the leaf plus the intermediate (what a
correctly configured server sends), ``leaf(name)`` the leaf alone (a chain missing its
intermediate). The CA file a client trusts is ``certs.ca``.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tests.support.skips import unavailable

LOOPBACK_SAN = "IP:127.0.0.1,DNS:localhost"
# name -> (subjectAltName, validity: openssl ca's -startdate/-enddate, or None for -days 2)
LEAVES: dict[str, tuple[str, tuple[str, str] | None]] = {
    "good": (LOOPBACK_SAN, None),
    "expired": (LOOPBACK_SAN, ("20200101000000Z", "20200201000000Z")),
    "not_yet_valid": (LOOPBACK_SAN, ("20400101000000Z", "20400201000000Z")),
    "wrong_host": ("DNS:stream.example.org", None),
}
_CA_CONFIG = """[ca]
default_ca = d
[d]
database = {db}/index.txt
serial = {db}/serial
new_certs_dir = {db}
default_md = sha256
policy = p
unique_subject = no
[p]
commonName = supplied
[ca_ext]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
[leaf_ext]
subjectAltName = ${{ENV::SAN}}
basicConstraints = CA:FALSE
extendedKeyUsage = serverAuth
"""


@dataclass(frozen=True)
class Certs:
    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    def leaf(self, name: str) -> Path:
        return self.directory / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.directory / f"{name}.key"

    def chain(self, name: str) -> Path:
        return self.directory / f"{name}-chain.pem"


def _openssl(directory: Path, *args: str, san: str = LOOPBACK_SAN) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True,
                   env={"PATH": "/usr/bin:/bin", "SAN": san})


def make_certs(directory: Path) -> Certs:
    """A root CA, an intermediate it signed, the ``LEAVES`` the intermediate signed, and a
    self-signed certificate ``self`` for 127.0.0.1."""
    if shutil.which("openssl") is None:
        unavailable("openssl CLI not installed")
    directory.mkdir(parents=True, exist_ok=True)
    db = directory / "db"
    db.mkdir()
    (db / "index.txt").write_text("")
    (db / "serial").write_text("1000\n")
    (directory / "ca.cnf").write_text(_CA_CONFIG.format(db=db))
    d = directory
    _openssl(d, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
             "/CN=ingestd test root", "-keyout", "ca.key", "-out", "ca.pem",
             "-config", "ca.cnf", "-extensions", "ca_ext")
    _issue(d, "int", "ca", "ca_ext", None)
    for name, (san, validity) in LEAVES.items():
        _issue(d, name, "int", "leaf_ext", validity, san=san)
        (d / f"{name}-chain.pem").write_text((d / f"{name}.pem").read_text()
                                             + (d / "int.pem").read_text())
    _openssl(d, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
             "/CN=127.0.0.1", "-addext", f"subjectAltName={LOOPBACK_SAN}", "-keyout",
             "self.key", "-out", "self.pem")
    return Certs(directory)


def _issue(d: Path, name: str, issuer: str, ext: str, validity: tuple[str, str] | None,
           san: str = LOOPBACK_SAN) -> None:
    _openssl(d, "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout",
             f"{name}.key", "-out", f"{name}.csr")
    dates = ["-startdate", validity[0], "-enddate", validity[1]] if validity else ["-days", "2"]
    _openssl(d, "ca", "-batch", "-notext", "-config", "ca.cnf", "-cert", f"{issuer}.pem",
             "-keyfile", f"{issuer}.key", "-in", f"{name}.csr", "-out", f"{name}.pem",
             "-extensions", ext, *dates, san=san)


ANSWER_503 = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
              b"Content-Length: 12\r\nConnection: close\r\n\r\nunavailable\n")


class TlsFront:
    """TLS on a free loopback port with ``cert`` (a PEM chain) and ``key``; behind it, plain TCP
    to ``upstream``, or (None) a 503 answer to any request. ``handshakes`` counts the completed
    ones, ``failed`` the refused ones (a client that did not trust the certificate)."""

    def __init__(self, cert: Path, key: Path, upstream: tuple[str, int] | None = None) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.upstream = upstream
        self.handshakes = 0
        self.failed = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> TlsFront:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._listener.close()
        with self._lock:
            for sock in self._open:
                _close(sock)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            conn = self.context.wrap_socket(client, server_side=True)
        except (ssl.SSLError, OSError):
            self.failed += 1
            _close(client)
            return
        self.handshakes += 1
        if self.upstream is None:
            try:
                conn.recv(65536)
                conn.sendall(ANSWER_503)
            except OSError:
                pass
            _close(conn)
            return
        try:
            upstream = socket.create_connection(self.upstream)
        except OSError:
            _close(conn)
            return
        with self._lock:
            self._open += [conn, upstream]
        threading.Thread(target=_pipe, args=(conn, upstream), daemon=True).start()
        _pipe(upstream, conn)


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    for sock in (src, dst):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()
