"""`hfsoup hub serve`: a Hub-protocol server on 127.0.0.1 (stdlib only)."""
