"""Real processes for ``swarmnode dev-swarm``, the integration tests and the benchmarks (never a mock of the network).

    localswarm.py   NodeProcess / LocalSwarm: N real node daemons on loopback, torn down with their p2pd
    reduce_peer.py  a standalone all-reduce participant process (``python -m node.devtools.reduce_peer``)
    stage_peer.py   a standalone stage-replica process (``python -m node.devtools.stage_peer``)
    serve_peer.py   a standalone served-stage process (``python -m node.devtools.serve_peer``): inference
"""
