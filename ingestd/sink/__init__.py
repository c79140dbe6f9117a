"""The sink stage: batching into MongoDB, compliance notices, retries and target policy, dead
letters."""
