"""The passes the worker's beat runs as tasks: the janitor (its threads are in ``worker/``)."""
