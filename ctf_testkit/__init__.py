"""Test support shared by ``tests/`` and ``bench/`` (installed with the dev install).

- :mod:`ctf_testkit.support`: a private redis-server, free ports, polling with a deadline,
  stand-in images built from in-memory files, a platform-style Celery client;
- :mod:`ctf_testkit.env`: one run's settings and a worker's environment, from one description;
- :mod:`ctf_testkit.worker`: the one way to start, kill and stop a real worker;
- :mod:`ctf_testkit.own_run`: a worker and the API on a Redis, labels and pool of a file's own;
- :mod:`ctf_testkit.docker_sweep`: the one sweeper of what a run labelled;
- :mod:`ctf_testkit.fake_driver`: an in-memory engine keeping the ``Driver`` contract.

No pytest here: the benchmarks are plain scripts.
"""
