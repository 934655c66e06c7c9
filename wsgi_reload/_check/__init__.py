"""The pre-reload check: a fresh interpreter imports the candidate code (fork server, probe, sandbox)."""
