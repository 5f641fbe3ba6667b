"""What a worker runs beside its tasks: the janitor, the event follower, inflight."""
