"""Discovery: who is in the pool (static file now; Kubernetes watch later)."""
