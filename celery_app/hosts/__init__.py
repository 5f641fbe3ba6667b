"""Several Docker hosts: the hosts file, heartbeats, placement and their queues."""
