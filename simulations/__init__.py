"""A discrete-event model of large swarms, reusing protocol/'s planning code unchanged.

Public names, by module:
  - engine:     Clock, Engine, Event                     (heap of timestamped events; the clock is injected)
  - model:      Gpu, GPUS, PopulationConfig, NodeDraw, draw_nodes   (links, latencies, real GPUs with sources)
  - churn:      ChurnConfig, ChurnProcess                 (heavy-tailed sessions at a fraction leaving per hour)
  - roundtime:  predict_round_time, butterfly, phases, Butterfly, Phases, payload_bytes
                (one all-reduce round's bytes and seconds; spans from protocol.planning.partition, sizes from
                protocol.allreduce.codecs)
  - federated:  FederatedConfig, FederatedSim, RoundRecord (groups running rounds:
                                                          protocol.allreduce.matchmaking plans)
  - byzantine:  judge, Verdict                            (hostile members against protocol.allreduce.robust's
                                                          aggregators and the runner's EXCLUDE_AFTER)
  - relays:     planning_bandwidths, with_relays, relay_cpu_s   (members behind NATs: spans, the relay hop, copying)
  - pipeline:   PipelineConfig, PipelineSim               (protocol.planning.stage_plan cuts,
                                                          protocol.planning.stage_assign incremental vs from-scratch
                                                          assignment)
  - swarm:      SwarmConfig, Swarm                        (everything on one engine; the report)
  - run:        the CLI: python -m simulations.run --nodes 10000 --churn 0.2 --hours 24
"""

from simulations.churn import ChurnConfig, ChurnProcess
from simulations.engine import Clock, Engine, Event
from simulations.federated import FederatedConfig, FederatedSim, RoundRecord
from simulations.model import GPUS, Gpu, NodeDraw, PopulationConfig, draw_nodes
from simulations.pipeline import PipelineConfig, PipelineSim
from simulations.roundtime import Butterfly, Phases, butterfly, payload_bytes, phases, predict_round_time
from simulations.swarm import Swarm, SwarmConfig

__all__ = [
    "Butterfly", "ChurnConfig", "ChurnProcess", "Clock", "Engine", "Event", "FederatedConfig", "FederatedSim",
    "GPUS", "Gpu", "NodeDraw", "Phases", "PipelineConfig", "PipelineSim", "PopulationConfig", "RoundRecord",
    "Swarm", "SwarmConfig", "butterfly", "draw_nodes", "payload_bytes", "phases", "predict_round_time",
]
