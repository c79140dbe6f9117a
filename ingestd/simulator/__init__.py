"""A faithful local stand-in for v1.1 ``POST statuses/filter`` (docs/protocol.md §1–§4, §9).

``ingestd simulate`` serves it on loopback: OAuth 1.0a checks, parameter limits, chunked (and
gzip) streams of real and generated tweets filtered by ``ingestd.documents.matching``, control
messages, scripted faults, and a ground-truth JSONL log of exactly what was sent.
Modules: ``server`` (HTTP), ``session`` (one stream), ``wire`` (framing), ``feed`` and
``generator`` (tweets), ``script`` (faults), ``auth``, ``params``, ``groundtruth``, ``cli``.
"""
