"""Test support shared by ``tests/`` and ``bench/`` (installed with the dev install).

``ctf_testkit.fake_driver`` is an in-memory engine keeping the ``Driver`` contract.
"""
