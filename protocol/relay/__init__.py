"""Reaching peers that cannot be reached: relays run by reachable peers, end-to-end sealed, and the dial-back check.

    circuits.py  the relay's side: RelayService (reservations, bounded circuits, the dial-back check), RelayLimits
    routes.py    both ends of a relayed stream: RelayRouter (dial through a relay, take a stream off one, reserve)
    seal.py      the ends' signed X25519 handshake and the AES-GCM records the relay cannot read or alter

Why not libp2p's circuit relay in p2pd: in a small swarm p2pd's autorelay waits out a fixed 3-minute boot delay
before it reserves a slot (measured; p2pd exposes no setting for it), and the daemon reads its addresses once at
start. A node's outbound connection to a reachable peer already carries streams both ways, so the relay here is
a few hundred lines on top of it, bounded by our own limits and visible to ``swarmnode doctor``.
"""
