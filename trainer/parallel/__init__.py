"""Process groups and the parallel layout (tensor x pipeline x data)."""

from trainer.parallel.topology import Topology, collective_failure, init_topology, shutdown_topology

__all__ = ["Topology", "collective_failure", "init_topology", "shutdown_topology"]
