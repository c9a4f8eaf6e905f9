"""Planning: pure functions and small state machines, no I/O, so the simulator (simulations/) runs them unchanged.

    partition.py     who owns which span of the flat vector in an all-reduce round
    round_policy.py  RoundPolicy: what a federated participant decides after each round (the daemon and the
                     simulator both decide through it)
    stage_plan.py    where to cut a model into pipeline stages (layer_wise, balanced, memory_aware)
    stage_assign.py  which node serves which stage: assign_nodes, rebalance on join/leave, follow_live,
                     replica groups, even_groups, best_group_order
"""
