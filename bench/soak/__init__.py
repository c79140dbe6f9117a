"""The soak proofs (``make soak``): long, real-process runs that reconcile against ground truth."""
