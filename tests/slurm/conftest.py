"""The SLURM tests' cluster: munge + slurmctld + two slurmd (n1, n2), one per session.

Needs root (network namespaces, munge, slurmd). Where slurm/munge are missing the fixture
installs them from Debian's packages; it skips, saying why, only when it is not root or the
packages cannot be installed. Anything else that goes wrong bringing the cluster up is an error.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.slurm.cluster import SlurmCluster, clean_leftovers, install_packages


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    if os.geteuid() != 0:
        pytest.skip("the SLURM tests need root: they create network namespaces and run munged/slurmd")
    problem = install_packages()
    if problem:
        pytest.skip(f"SLURM packages unavailable: {problem}")
    clean_leftovers()  # namespaces and daemons of an earlier run that crashed
    cluster = SlurmCluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()
