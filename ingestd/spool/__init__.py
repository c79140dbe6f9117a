"""The spool stage: the bounded, crash-safe on-disk queue between the stream and store workers."""
