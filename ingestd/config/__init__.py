"""Settings: the schema of settings.yaml and its loader (every error at once, with file and key
path)."""
