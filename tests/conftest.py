"""Shared fixtures: MongoDB (the nx-27017 stand-in, or a real server) from tests/support/mongo.py.

pytest finds fixtures by name in this module's namespace, so they are imported here by name.
"""

from tests.support.mongo import (
    mongo_client,
    mongo_database,
    mongo_server,
    mongo_standin,
    mongo_uri,
)

__all__ = ["mongo_client", "mongo_database", "mongo_server", "mongo_standin", "mongo_uri"]
