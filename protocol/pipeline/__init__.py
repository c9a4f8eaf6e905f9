"""What crosses the wire in pipeline training, between a trainer, stage replicas and backup holders, and in serving.

    activations.py  forward/backward frames (activations and gradients; fp32/fp16/bf16 on the wire)
    control.py      control messages (Status, Commit, EndStep, Resync, Advance, Discard, state transfer, direct
                    sessions), DHT member records, protocol names
    direct.py       sealed frames of the direct TCP data path (AES-256-GCM sessions handed out over libp2p)
    inference.py    inference frames of served stages (a session's tokens in, a stage's output back; bounded, checked)
"""
