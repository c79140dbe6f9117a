"""Tools around the daemon: check, demo and the embedded MongoDB stand-in."""
