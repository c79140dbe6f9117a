"""The MongoDB target the store worker writes to, and the settings in force.

A reload's settings are taken between batches (``switch``): a batch finishes against the target
it was taken for. The exception is a failing target (see ``retry.Retrier``).
"""

from __future__ import annotations

from collections.abc import Callable

import structlog
from pymongo.collection import Collection

from ingestd.config.schema import MongoSettings, Settings
from ingestd.documents.encoder import MAX_BSON_SIZE
from ingestd.sink.mongo import Document

log = structlog.get_logger("ingestd.sink.target")

CollectionFactory = Callable[[MongoSettings], Collection[Document]]


class MongoTarget:
    """The collection, the settings it was opened by, and the next settings waiting to apply.

    ``collection`` is looked up at call time by every MongoDB call: a retry may switch it.
    """

    def __init__(self, settings: Settings, factory: CollectionFactory,
                 on_settings: Callable[[Settings], None]) -> None:
        self.settings = settings
        self.next_settings: Settings | None = None
        self._factory = factory
        self._on_settings = on_settings  # told of every settings switch (after it)
        self.collection = factory(settings.mongo)
        self.epoch = 0  # bumped on every switch of target: ends a back-off early
        self.ready = False  # tombstones loaded for this target
        self.indexes_done = False
        self.tombstone_ttl: int | None = None  # the retention the TTL index was last set to

    def new_target_pending(self) -> bool:
        new = self.next_settings
        return new is not None and new.mongo != self.settings.mongo

    def switch(self) -> None:
        """Use the next settings, if any; a new Mongo target starts unprepared."""
        new, self.next_settings = self.next_settings, None
        if new is None:
            return
        old = self.settings
        self.settings = new
        log_notices(new)
        self._on_settings(new)
        if new.mongo != old.mongo:
            log.info("mongo_target_changed", database=new.mongo.database,
                     collection=new.mongo.collection)
            self.collection.database.client.close()
            self.collection = self._factory(new.mongo)
            self.epoch += 1
            self.ready = self.indexes_done = False
            self.tombstone_ttl = None
        elif new.stream.api != old.stream.api:
            self.indexes_done = False  # the other API's documents are queried by other fields

    def servers(self) -> str:
        """The servers the client knows of (its seeds, or those it discovered), as host:port."""
        known = self.collection.database.client.topology_description.server_descriptions()
        return ",".join(sorted(f"{host}:{port}" for host, port in known))

    def tombstones(self) -> Collection[Document]:
        """``<collection>_deleted``: the ids of deleted tweets."""
        return self.collection.database[self.collection.name + "_deleted"]

    def max_bson_size(self) -> int:
        """The smallest document limit the known servers announced (16 MiB on any mongod)."""
        servers = self.collection.database.client.topology_description.server_descriptions()
        sizes = [s.max_bson_size for s in servers.values() if s.max_bson_size > 0]
        return min([MAX_BSON_SIZE, *sizes])

    def close(self) -> None:
        self.collection.database.client.close()


def log_notices(settings: Settings) -> None:
    """Settings keys that are accepted but do nothing: said once per load, never fatal."""
    for notice in settings.mongo.notices:
        log.warning("settings_key_ignored", detail=notice)
