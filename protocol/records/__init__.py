"""What nodes publish in the DHT, and the signed-record validators every node runs.

    peer.py            PeerRecord, Capability, GpuInfo and their wire form; swarm_key
    peer_keys.py       Ed25519 keys as libp2p peer ids (one key signs records and identifies the node)
    validation.py      SignedDictionaryValidator, SignedPeerRecordValidator, signed_payload, key_id
    job_spec.py        JobSpec (ModelSpec, InnerOpt, OuterOpt, PipelineSpec), job_id_for, its wire form
    job_inputs.py      DataSpec (own data's declared schema), ModelFile (a model folder's manifest), AdapterSpec,
                       PRECISIONS
    job_records.py     JobRecord, PipelineAssignment, JobProgress, their DHT keys and wire form
    job_validation.py  SignedJobRecordValidator
    values.py          the value checks every job record field passes (ValueError naming the field)
    certificates.py    MembershipCert: a private swarm owner's signature admitting a member; issue, check, wire
    membership_validation.py  MembershipValidator: a private swarm's records carry their writer's certificate
"""
