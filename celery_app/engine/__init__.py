"""The container engine: the Driver seam, the Docker driver, the egress firewall."""
