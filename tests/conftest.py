"""Shared fixtures (owned by the lead; created minimal by the writer task)."""

from tests.support.mongo import *  # noqa: F403
