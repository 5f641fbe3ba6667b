"""Several Docker hosts: the hosts file, liveness, placement, presentation and queues."""
