"""Federated jobs: every participant trains the whole model on its own data; top-k all-reduce rounds average.

    federated_jobs.py  FederatedJobs: decide to take part, run the rounds (round policy from
                       protocol/planning/round_policy.py), stay in sync, serve and fetch state, export
    runner.py          JobRunner: one node's model replica, private data and rounds (Averager underneath)
    local_training.py  local steps, the pseudo-gradient, the outer step (FedAvg, DiLoCo)
    export.py          the model, manifest, per-round report and curve a job leaves on disk
    checkpoints.py     per-round checkpoints (atomic, sha256-verified, pruned) and the power-cut resume rule
    script_runs.py     runs whose local steps are a Python script's own (swarmnode.Optimizer): the parameter
                       layout a run binds, the hand-over between the script and ScriptRunner
"""
