"""Jobs on this node: what the swarm asks to train, and this node's part in it.

    board.py    JobBoard: every job record and progress entry read from the DHT into JobViews; what this node
                publishes (records it submits, its progress, its declines)
    manager.py  JobManager: submit, cancel, export; polls the board and hands each job to its kind (JobKind)
    spec.py     job files (TOML) -> JobSpec
    policy.py   JobLimits: whose jobs this node runs (accept_jobs_from) and its per-job limits, pure
    model_files.py  ModelStore: job model folders in <home>/models, fetched from peers, verified, served
    federated/  FederatedJobs: rounds of local training and top-k all-reduce, state sync, export
    pipeline/   PipelineJobs: a model cut into stages hosted by other nodes, trained by the submitter
    serve/      ServeJobs: a model's stages hosted by other nodes for inference, the submitter's HTTP endpoint
"""
