"""Pipeline jobs: one causal LM cut into stages, each hosted by replicas on other nodes, trained by the submitter.

    pipeline_jobs.py  PipelineJobs: plan, place, split and serve shards (submitter); host an assigned stage
                      (every node); train and follow the live peers (submitter)
    trainer.py        PipelineTrainer: routes micro-batches through one replica per stage and ends each step
    steps.py          TrainerConfig, StepReport, StageStep, PipelineError, HopError, causal_lm_loss
    throughput.py     a step's history entry: tokens per second, each stage's load, the bottleneck stage
    stage_host.py     StageHost: one replica of one stage (forward, backward, commit, step end, state)
    stage_config.py   StageConfig, StageHooks
    stage_device.py   StageCompute: a stage's forward/backward on the node's device, in the job's precision
    stage_state.py    a stage's state as safetensors bytes, its checks and its transfer
    direct_server.py  DirectServer: the host's side of the direct TCP data path
    direct_client.py  DirectPool: the trainer's side of it
"""
