"""swarmnode's daemon and CLI: everything with state, processes or files. One subpackage per role, on a one-way
stack (each imports only those below it; protocol/ is below all of node/):

    cli/       the ``swarmnode`` command                                  -> api/ (talks to a daemon), devtools/
    daemon.py  Daemon: the one composition root (p2pd, DHT, membership, jobs, control API); it is the NodeService
    api/       the local control API: gRPC server over a NodeService, client, proto <-> Python (serde)
    jobs/      jobs on this node: the board (DHT records), the manager, federated/ and pipeline/ kinds
    serving/   inference over served stages: stage hosts, the client, the OpenAI-compatible HTTP endpoint
    ml/        models, datasets, pipeline stages and the splitter (torch/transformers; no networking)
    runtime/   the daemon's plumbing: config, home, identity, p2pd, membership, capability, files, errors
    devtools/  real node and peer processes for dev-swarm, tests and benchmarks

docs/ARCHITECTURE.md draws the tree; each subpackage's front door lists its modules.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
