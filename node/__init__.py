"""swarmnode's daemon and CLI: everything with state, processes or files.

Modules:
  - config: NodeConfig, and how flags, SWARMNODE_* variables and a TOML file combine
  - identity: the node's Ed25519 key (also its libp2p identity) and the home-directory lock
  - capability: hardware detection and the matmul micro-benchmark
  - membership: Membership (heartbeat-published signed record) and the live peer list
  - control: the gRPC control API servicer and server (Unix socket 0600, or loopback TCP + token)
  - client: ControlClient, what the CLI uses to talk to a running daemon
  - daemon: Daemon, the async core that ties p2pd, the DHT, membership and the control API together
  - localswarm: NodeProcess / LocalSwarm, real node processes on loopback (dev-swarm, tests, benchmarks)
  - cli: the ``swarmnode`` command
  - rpc: generated protobuf / gRPC code (regenerate with ``make protos``)
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
