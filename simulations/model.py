"""Who volunteers: each node's link (bandwidth, latency), GPU (published TFLOPS, memory) and effective speed.

    from simulations.model import PopulationConfig, draw_nodes
    nodes = draw_nodes(PopulationConfig(), 1000, np.random.default_rng(0))   # list of NodeDraw

Bandwidth is log-uniform over [bw_min_mbit, bw_max_mbit] (the issue's home links of 10-1000 Mbit/s; its median,
100 Mbit/s, is close to the worldwide fixed-broadband median download speed of ~90 Mbit/s in the Ookla Speedtest
Global Index, 2024). Links are modelled symmetric: the same rate up and down (a simplification; many home
links upload slower). Latency is each node's one-way delay to the network core, lognormal (median
latency_median_ms, sigma latency_sigma), so the round trip between nodes i and j is 2 * (lat_i + lat_j): a median
near 80 ms, in the range of WonderNetwork's published city-to-city ping tables (20-60 ms within a continent,
100-300 ms between continents). The GPU is drawn from GPUS by weight; its effective training speed is
``mfu`` * its half-precision tensor TFLOPS (fp32 TFLOPS for cards without fast fp16/bf16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MBIT = 1e6 / 8  # bytes/s per Mbit/s (SI: tc's "mbit" and ISPs' "Mbit/s" are 10**6 bits/s)
GB = 1e9


@dataclass(frozen=True)
class Gpu:
    name: str
    fp32_tflops: float  # peak, non-tensor
    half_tflops: float | None  # peak dense fp16/bf16 tensor TFLOPS with fp32 accumulate; None: no fast half
    memory_gb: float
    weight: float  # relative share among volunteers
    source: str

    @property
    def train_tflops(self) -> float:
        """Peak TFLOPS for mixed-precision training (tensor cores if present, else fp32)."""
        return self.half_tflops if self.half_tflops is not None else self.fp32_tflops


# Peak numbers are the vendors' published dense figures (sparsity doubles excluded). GeForce cards run fp16/bf16
# tensor math with fp32 accumulate at half the fp16-accumulate rate; that is the rate mixed-precision training
# uses. Weights: consumer cards roughly in proportion to their shares in the Steam Hardware & Software Survey
# (GPU tab, late 2024; rounded), data-centre cards given small shares as an assumption (lab or rented machines).
GPUS: tuple[Gpu, ...] = (
    Gpu("GTX 1080 Ti", 11.3, None, 11, 3, "NVIDIA GeForce GTX 1080 Ti specifications (11.3 TFLOPS fp32; Pascal "
        "has no tensor cores and runs fp16 at 1/64 rate)"),
    Gpu("RTX 2080 Ti", 13.4, 53.8, 11, 3, "NVIDIA Turing GPU Architecture whitepaper (2018), Appendix A: "
        "13.4 TFLOPS fp32, 53.8 fp16 tensor w/ fp32 acc (Turing has no bf16)"),
    Gpu("RTX 3060", 12.7, 25.5, 12, 20, "NVIDIA GA102 whitepaper per-SM rates (512 dense fp16/bf16 FLOP/clk/SM "
        "w/ fp32 acc) x 28 SMs x 1.777 GHz boost; 12.7 TFLOPS fp32 from NVIDIA's RTX 3060 specifications"),
    Gpu("RTX 3070", 20.3, 40.6, 8, 12, "NVIDIA Ampere GA102 GPU Architecture whitepaper (2020), Appendix A"),
    Gpu("RTX 3080", 29.8, 59.5, 10, 8, "NVIDIA Ampere GA102 GPU Architecture whitepaper (2020), Appendix A"),
    Gpu("RTX 3090", 35.6, 71.0, 24, 4, "NVIDIA Ampere GA102 GPU Architecture whitepaper (2020), Appendix A"),
    Gpu("RTX 4060", 15.1, 30.2, 8, 16, "NVIDIA Ada GPU Architecture whitepaper per-SM rates x 24 SMs x 2.46 GHz "
        "(fp8 sparse 242 'AI TOPS' on NVIDIA's RTX 4060 page / 8)"),
    Gpu("RTX 4070", 29.1, 58.3, 12, 12, "NVIDIA Ada GPU Architecture whitepaper per-SM rates x 46 SMs x 2.475 GHz"),
    Gpu("RTX 4090", 82.6, 165.2, 24, 5, "NVIDIA Ada GPU Architecture whitepaper (2022), Appendix A"),
    Gpu("Tesla T4", 8.1, 65.0, 16, 3, "NVIDIA T4 datasheet: 8.1 TFLOPS fp32, 65 TFLOPS mixed fp16/fp32"),
    Gpu("V100 SXM2", 15.7, 125.0, 32, 2, "NVIDIA V100 datasheet: 15.7 TFLOPS fp32, 125 TFLOPS tensor (no bf16)"),
    Gpu("A100 SXM 80GB", 19.5, 312.0, 80, 2, "NVIDIA A100 datasheet: 19.5 TFLOPS fp32, 312 TFLOPS bf16 dense"),
    Gpu("H100 SXM", 67.0, 989.4, 80, 1, "NVIDIA H100 datasheet: 67 TFLOPS fp32, 989 TFLOPS bf16 dense "
        "(1979 with sparsity)"),
)


@dataclass(frozen=True)
class PopulationConfig:
    bw_min_mbit: float = 10.0  # the issue: home links of 10-1000 Mbit/s
    bw_max_mbit: float = 1000.0
    latency_median_ms: float = 20.0  # one-way, node to core (see the module docstring)
    latency_sigma: float = 0.6  # lognormal sigma: 90% of nodes between ~7 and ~54 ms
    latency_max_ms: float = 200.0  # clip: a satellite link's one-way delay is ~300 ms, we stop before
    mfu: float = 0.35  # model FLOPs utilisation. PaLM reached 46.2% on TPU v4 (Chowdhery et al. 2022, Table 3),
    #                    Megatron-LM 52% at 1T params on A100s (Narayanan et al. 2021); single consumer GPUs
    #                    behind a volunteer's scheduler: we assume 35%.
    gpus: tuple[Gpu, ...] = GPUS

    def __post_init__(self) -> None:
        if not 0 < self.bw_min_mbit <= self.bw_max_mbit or not math.isfinite(self.bw_max_mbit):
            raise ValueError(f"need 0 < bw_min_mbit <= bw_max_mbit, got {self.bw_min_mbit}, {self.bw_max_mbit}")
        if not self.latency_median_ms >= 0 or not self.latency_sigma >= 0 or not self.latency_max_ms >= 0:
            raise ValueError("latency parameters must be >= 0")
        if not 0 < self.mfu <= 1:
            raise ValueError(f"mfu must be in (0, 1], got {self.mfu}")
        if not self.gpus or any(g.weight <= 0 for g in self.gpus):
            raise ValueError("gpus must be non-empty with positive weights")


@dataclass(frozen=True)
class NodeDraw:
    bandwidth: float  # bytes/s, both directions
    latency: float  # s, one-way to the core
    gpu: int  # index into PopulationConfig.gpus
    tflops: float  # effective: mfu * train_tflops (TFLOPS actually delivered to the model)
    memory_bytes: float


def draw_nodes(config: PopulationConfig, n: int, rng: np.random.Generator) -> list[NodeDraw]:
    """``n`` independent nodes; the same rng state gives the same nodes."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    lo, hi = math.log(config.bw_min_mbit), math.log(config.bw_max_mbit)
    bw = np.exp(rng.uniform(lo, hi, n)) * MBIT  # (n,) bytes/s
    lat = np.minimum(config.latency_median_ms * np.exp(rng.normal(0.0, config.latency_sigma, n)),
                     config.latency_max_ms) / 1e3  # (n,) s
    weights = np.array([g.weight for g in config.gpus], float)
    gpu = rng.choice(len(config.gpus), size=n, p=weights / weights.sum())  # (n,)
    return [NodeDraw(float(b), float(t), int(g), config.mfu * config.gpus[g].train_tflops,
                     config.gpus[g].memory_gb * GB) for b, t, g in zip(bw, lat, gpu)]


def share_with_memory(config: PopulationConfig, memory_bytes: float) -> float:
    """Expected fraction of nodes whose GPU has at least ``memory_bytes``."""
    total = sum(g.weight for g in config.gpus)
    return sum(g.weight for g in config.gpus if g.memory_gb * GB >= memory_bytes) / total
