"""The worker's passes: the janitor (a beat task) and the solvers' canary loop (SPEC §14)."""
