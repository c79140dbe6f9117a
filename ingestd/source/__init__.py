"""The source stage: the connection to the streaming endpoint, framing, back-off, v1.1/v2
requests."""
