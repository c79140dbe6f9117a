"""Reading settings.yaml: YAML (duplicate keys refused), `${NAME}` substitution, error collection.

`${NAME}` comes from the environment, else from `$CREDENTIALS_DIRECTORY/NAME` (systemd
credentials). Every substituted value is remembered so that no error message can echo it.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import yaml

from ingestd.config.errors import ConfigError, ConfigErrors
from ingestd.config.values import kind
from ingestd.logs import MASK, scrub_userinfo


class Missing:
    """Sentinel: the key is absent (distinct from an explicit null)."""


MISSING = Missing()
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Bounds on the settings tree once YAML aliases are expanded: the largest real file (5,000 follow
# ids, 400 phrases, v2 rules) has ~10k values and 5 levels. A file beyond them is an alias bomb
# (billion laughs) or a mistake, refused with a reason instead of exhausting memory or the stack.
MAX_VALUES = 100_000
MAX_DEPTH = 32


class Context:
    """Collects errors; remembers substituted values so no reason can echo them."""

    def __init__(self, path: Path, env: Mapping[str, str], *, secrets: bool = True,
                 resolve: tuple[str, ...] = (), check_files: bool = True) -> None:
        self.path = path
        self.env = env
        self.secrets = secrets
        self.resolve = resolve  # key paths resolved even without ``secrets`` (mongo.uri…)
        # False: a file the settings name (stream.ca_file) is not looked for. A worker loading
        # the text its supervisor validated: the file may be gone since, which its use reports.
        self.check_files = check_files
        self.errors: list[ConfigError] = []
        self.substituted: list[str] = []
        self.unresolved: set[str] = set()  # key paths left as `${NAME}` when not resolving

    def error(self, key_path: str, reason: str) -> None:
        if key_path in self.unresolved:
            return  # the value is a placeholder on purpose: nothing to say about it
        for value in sorted(self.substituted, key=len, reverse=True):
            if value:
                reason = reason.replace(value, MASK)
        self.errors.append(ConfigError(self.path, key_path, scrub_userinfo(reason)))

    def fail(self, reason: str) -> ConfigErrors:
        return ConfigErrors([ConfigError(self.path, "", reason)])


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag.endswith(":str"):
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """A scalar PyYAML cannot turn into its type (an integer of over 4300 digits, the date
        2026-02-30) is a YAML error at its line, not a ValueError out of the loader."""
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:
            raise yaml.constructor.ConstructorError(
                None, None, _unreadable(node, exc), node.start_mark) from None


def _unreadable(node: yaml.Node, exc: Exception) -> str:
    """Why a scalar could not be read; never its text (a line of the file may hold a secret)."""
    kind = str(node.tag).rpartition(":")[2]
    if kind == "int" and isinstance(node.value, str):
        digits = sum(c.isdigit() for c in node.value)
        return f"an integer of {digits} digits cannot be read (at most 4300)"
    return f"cannot read this value as a {kind}: {exc}"


def parse_yaml(text: str, ctx: Context) -> dict[object, object]:
    try:
        raw: object = yaml.load(text, Loader=StrictLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        # Only problem/context/position: str(exc) quotes file lines, which may hold secrets.
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        detail = "; ".join(p for p in (exc.context, exc.problem) if p)
        raise ctx.fail(f"YAML syntax error at {where}: {detail}") from None
    except yaml.reader.ReaderError as exc:
        where = f"character offset {exc.position}"
        raise ctx.fail(f"YAML error at {where}: {exc.reason} (#x{exc.character:04x})") from None
    except yaml.YAMLError as exc:
        raise ctx.fail(f"YAML error: {type(exc).__name__}") from None
    except RecursionError:
        raise ctx.fail(f"YAML nested too deeply (at most {MAX_DEPTH} levels)") from None
    if raw is None:
        raise ctx.fail("file is empty: expected a mapping with stream, auth and mongo sections")
    if not isinstance(raw, dict):
        raise ctx.fail(f"top level must be a mapping of sections, got {kind(raw)}")
    return raw


def interpolate(value: Any, path: str, ctx: Context) -> Any:
    """Replace `${NAME}` in every string: env var NAME, else $CREDENTIALS_DIRECTORY/NAME.

    Returns a tree without shared parts (YAML aliases are copied); a recursive alias, a tree
    nested deeper than ``MAX_DEPTH`` or larger than ``MAX_VALUES`` is refused (``ConfigErrors``).
    """
    return _Expansion(ctx).copy(value, path, ())


class _Expansion:
    """One walk of the parsed tree, with its bounds."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.values = 0

    def copy(self, value: Any, path: str, open_ids: tuple[int, ...]) -> Any:
        self.values += 1
        if self.values > MAX_VALUES:
            raise self.refuse(_top(path), f"expands to more than {MAX_VALUES:,} values "
                                          "(YAML aliases repeated inside aliases?)")
        if isinstance(value, dict | list):
            if id(value) in open_ids:
                raise self.refuse(path, "a YAML alias refers to a value that contains it "
                                        "(a recursive alias)")
            if len(open_ids) >= MAX_DEPTH:
                raise self.refuse(_top(path), f"nested deeper than {MAX_DEPTH} levels")
            inside = (*open_ids, id(value))
            if isinstance(value, dict):
                return {k: self.copy(v, join(path, str(k)), inside) for k, v in value.items()}
            return [self.copy(v, f"{path}[{i}]", inside) for i, v in enumerate(value)]
        if isinstance(value, str):
            return _VAR.sub(lambda m: _lookup(m.group(1), path, self.ctx), value)
        return value

    def refuse(self, path: str, reason: str) -> ConfigErrors:
        return ConfigErrors([ConfigError(self.ctx.path, path, reason)])


def _top(path: str) -> str:
    """The top-level key of ``path``: ``stream`` for ``stream.track[3]``."""
    return re.split(r"[.\[]", path, maxsplit=1)[0]


def _lookup(name: str, path: str, ctx: Context) -> str:
    if not ctx.secrets and path not in ctx.resolve:
        ctx.unresolved.add(path)
        return f"${{{name}}}"
    found = ctx.env.get(name)
    if found is not None and not _decodes(found):
        # Python carries an environment value's undecodable bytes as lone surrogates, which
        # no later step can encode (a traceback out of `check`, a store worker dying on the
        # URI): refused here, naming the variable and never the value.
        ctx.error(path, f"environment variable {name} (for ${{{name}}}) is not valid UTF-8")
        return f"${{{name}}}"
    if found is None:
        found = _read_credential(name, path, ctx)
    if found is None:
        return f"${{{name}}}"  # left as is: the error above already names the key
    ctx.substituted.append(found)
    return found


def _decodes(value: str) -> bool:
    """Whether ``value`` is text, not undecodable bytes (``surrogateescape``'s lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _read_credential(name: str, path: str, ctx: Context) -> str | None:
    cred_dir = ctx.env.get("CREDENTIALS_DIRECTORY")
    missing = (f"${{{name}}} is not set: define environment variable {name} or a systemd "
               f"credential {name} (LoadCredential=)")
    if not cred_dir:
        ctx.error(path, missing)
        return None
    where = Path(cred_dir) / name  # named in every error: which folder was looked in
    try:
        data = where.read_text(encoding="utf-8")
    except FileNotFoundError:
        absent = "no such file" if Path(cred_dir).is_dir() else \
            f"$CREDENTIALS_DIRECTORY {cred_dir} is not a folder"
        ctx.error(path, f"{missing}; looked in {where}: {absent}")
        return None
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not valid UTF-8"
        ctx.error(path, f"cannot read credential {name} from {where}: {why}")
        return None
    value = data.removesuffix("\n").removesuffix("\r")
    if not value:
        ctx.error(path, f"credential {name} ({where}) is empty")
        return None
    return value




def join(path: str, key: str) -> str:
    """The key path of `key` inside the mapping at `path`: "stream" + "track" → "stream.track"."""
    return f"{path}.{key}" if path else key
