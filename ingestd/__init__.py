"""ingestd: a supervised stream-to-MongoDB ingestion daemon."""

__version__ = "0.1.0"
