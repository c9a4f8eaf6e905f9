"""swarmnode for Python scripts: train in a swarm run from your own training loop, on your own data and device.

    import swarmnode
    swarm = swarmnode.Swarm(join=["/ip4/.../p2p/12D3KooW..."], home="~/.swarmnode/run1")
    opt = swarmnode.Optimizer(torch.optim.AdamW(model.parameters()), swarm=swarm, run_id="my-run", model=model)
    history = swarmnode.FederatedTrainer(MyNet(), swarm=swarm, run_id="churn").train(train_data, validation_data)

    swarm.py      Swarm: a whole swarm node (node/daemon.py) on a background thread of the script
    optimizer.py  Optimizer: wraps a torch optimizer; every local_steps steps, the run's round
    trainer.py    FederatedTrainer: rounds of local epochs and evaluation in one call
    callbacks.py  SwarmCallback: the Optimizer's rounds inside a Hugging Face Trainer

The rounds themselves are the daemon's (node/jobs/federated/script_runs.py): a run is a job on the swarm's board
like any other, listed by `swarmnode jobs` on every node.
"""

from node.jobs.federated.script_runs import RunEnded
from node.runtime.errors import NodeError
from swarmnode.optimizer import Optimizer
from swarmnode.swarm import Swarm
from swarmnode.trainer import FederatedTrainer

__all__ = ["FederatedTrainer", "NodeError", "Optimizer", "RunEnded", "Swarm"]
