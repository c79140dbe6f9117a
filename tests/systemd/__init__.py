"""`make test-systemd`: the shipped unit under a real systemd, in Debian containers."""
