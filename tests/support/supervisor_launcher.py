"""Runs the real ``Supervisor`` with fake workers and a minimal settings object (tests only).

    python supervisor_launcher.py SETTINGS.yaml

The settings file is a small YAML mapping: ``state_dir``, ``control`` (the four supervisor
numbers) and ``stream.track``. Anything unparsable raises the real ``ConfigError``, so the
supervisor's reload path is the production one; only the schema is smaller. Logs are JSON lines
on stdout, one event per line.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import yaml

from ingestd.config.errors import ConfigError
from ingestd.control.supervisor import Supervisor

FAKE_WORKER = Path(__file__).with_name("fake_worker.py")


@dataclass(frozen=True)
class FakeControl:
    stop_timeout: float = 10.0
    heartbeat_timeout: float = 30.0
    crash_loop_restarts: int = 5
    crash_loop_window: float = 60.0


@dataclass(frozen=True)
class FakeStream:
    track: tuple[str, ...] = ()  # the supervisor compares streams with ==


@dataclass(frozen=True)
class FakeSettings:
    state_dir: Path
    control: FakeControl
    stream: FakeStream


def load_fake_settings(text: str, path: Path) -> FakeSettings:
    """The test schema; errors are ``ConfigError(file, key_path, reason)`` like the real loader."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(path, "", f"not valid YAML ({type(exc).__name__})") from None
    if not isinstance(doc, dict) or "state_dir" not in doc:
        raise ConfigError(path, "", "expected a mapping with state_dir")
    control = section(doc, "control", path)
    stream = section(doc, "stream", path)
    try:
        return FakeSettings(Path(doc["state_dir"]), FakeControl(**control),
                            FakeStream(tuple(stream.get("track", ()))))
    except TypeError as exc:
        raise ConfigError(path, "control", str(exc)) from None


def section(doc: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(path, name, "expected a mapping")
    return value


def fake_worker_command(state_dir: Path) -> Any:
    def command(role: str, generation: int) -> list[str]:
        return [sys.executable, str(FAKE_WORKER), "--role", role,
                "--generation", str(generation), "--state-dir", str(state_dir)]

    return command


def main() -> int:
    config = Path(sys.argv[1])
    structlog.configure(processors=[
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        structlog.processors.JSONRenderer(),
    ])
    settings = load_fake_settings(config.read_text(), config)
    supervisor = Supervisor(config, settings, fake_worker_command(settings.state_dir),
                            loader=load_fake_settings)
    return supervisor.run()


if __name__ == "__main__":
    raise SystemExit(main())
