"""The daemon's plumbing: what every node needs before it can take part in anything.

    config.py      NodeConfig: flags > SWARMNODE_* environment > TOML file > defaults
    home.py        checks of the home and data directories (one-line errors, exit 2)
    identity.py    the Ed25519 key (also the libp2p identity) and the home-directory lock
    p2pd.py        OwnedP2PDaemon: hivemind's go-libp2p daemon as a child this node fully owns
    membership.py  Membership: this node's signed peer record on a heartbeat; PeerView, the live peer list
    reachability.py  Reachability: reachable or behind a NAT (peers dial back), a private node's relays
    doctor.py      diagnose: reachability checked afresh, relays, every peer's route, RTT and throughput; advice
    admission.py   Admission: who is a member of the swarm; in a private swarm, whom to serve and round with
    private_swarm.py  a private swarm on disk: the owner key, certificate files, this node's certificate
    capability.py  what this machine brings (GPUs, cores, memory, a matmul benchmark)
    device.py      the device a node trains on (--device), its free memory, mixed precision (autocast, scaler)
    backoff.py     retry with exponential backoff (injected sleep)
    files.py       atomic_write: temporary file, fsync, rename, fsync the directory; fsync_dir
    errors.py      NodeError and the exit codes
"""
