"""The spool's checksum: CRC32C (Castagnoli), computed by the crc32c library's C extension.

The library's package ``__init__`` imports ``importlib.metadata`` only to set ``__version__``:
~100 modules (email, zipfile, csv, ...) and up to ~2.3 MB of private memory in a process that
imports it, and the supervisor and the stream worker import nothing else that needs them (issue
15's memory goal; ``docs/design.md``, what each process loads). So the extension module is loaded
on its own, as the package itself would load it. If the library's layout ever changes, or the
loaded function fails the standard check value, the plain package import is used instead.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from types import ModuleType
from typing import Protocol

_EXTENSION = "crc32c._crc32c"
# CRC-32C of b"123456789" (the check value of the Rocksoft model, RFC 3720 B.4)
_CHECK = (b"123456789", 0xE3069283)


class Crc32c(Protocol):
    def __call__(self, data: bytes | bytearray | memoryview, value: int = 0, /) -> int: ...


def _extension() -> ModuleType | None:
    """``crc32c._crc32c`` loaded without running its package's ``__init__`` (None: not found)."""
    loaded = sys.modules.get(_EXTENSION)
    if loaded is not None:
        return loaded
    package = importlib.util.find_spec("crc32c")  # finds it without importing it
    if package is None or not package.submodule_search_locations:
        return None
    spec = importlib.machinery.PathFinder.find_spec(_EXTENSION,
                                                    list(package.submodule_search_locations))
    if spec is None or not isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # Registered, so a later ``import crc32c`` elsewhere reuses it instead of loading it again.
    sys.modules[_EXTENSION] = module
    return module


def _load() -> Crc32c:
    try:
        module = _extension()
        function: Crc32c | None = getattr(module, "crc32c", None)
        if function is not None and function(_CHECK[0]) == _CHECK[1]:
            return function
    except (ImportError, OSError):
        pass
    return _package_function()


def _package_function() -> Crc32c:
    from crc32c import crc32c as function  # the library's own way in, with its ``__init__``

    return function


crc32c: Crc32c = _load()
