"""A stage's compute on the node's device (node/runtime/device.py), in the job's precision.

    compute = StageCompute(stage, torch.device("cuda", 0), "bf16")
    x, out = compute.forward(tensor)            # kept for the backward; compute.to_wire(out) is what is sent
    flat, grad_in = compute.backward(x, out, grad)
    compute.sync()                              # after the optimizer stepped (or a state was loaded)

The stage module the host was given stays the master copy: float32 on the CPU, with its optimizer (foreach=False),
so that every replica of a stage applies the same averaged gradient with the same CPU float operations and stays
bit-identical, whatever device each one computes on. On a GPU the forward and backward run on a copy of the module
there (under autocast in the job's precision), refreshed from the master after each optimizer step; on the CPU the
copy is the master itself (nothing is copied). Everything that leaves -- activations, input gradients, parameter
gradients -- comes back to the CPU as float32 before it reaches the wire or the accumulator.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from node.runtime.device import autocast, check_precision


class StageCompute:
    def __init__(self, stage: nn.Module, device: torch.device | None = None, precision: str = "fp32"):
        self.device = torch.device("cpu") if device is None else device
        check_precision(self.device, precision)
        self.precision, self.master = precision, stage
        self.first = bool(getattr(stage, "is_first", False))  # token ids in: no input gradient
        self.module = stage if self.device.type == "cpu" else copy.deepcopy(stage).to(self.device)
        self._params = [p for _, p in self.module.named_parameters()]  # the master's order
        self._pairs = list(zip([p for _, p in stage.named_parameters()], self._params))

    def sync(self) -> None:
        """Copy the master parameters onto the device copy (nothing to do on the CPU)."""
        if self.module is not self.master:
            with torch.no_grad():
                for src, dst in self._pairs:
                    dst.copy_(src, non_blocking=True)

    def evaluate(self, tensor: torch.Tensor) -> torch.Tensor:
        """Forward only (nothing kept): the output as CPU float32."""
        with torch.no_grad(), autocast(self.device, self.precision):
            return self.to_wire(self.module(tensor.to(self.device)))

    def forward(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(input on the device, output with its graph) of one training micro-batch."""
        x = tensor.to(self.device)
        if not self.first:
            x.requires_grad_(True)
        with torch.enable_grad(), autocast(self.device, self.precision):
            out = self.module(x)  # (b, T, H) or logits (b, T, V)
        return x, out

    @staticmethod
    def to_wire(out: torch.Tensor) -> torch.Tensor:
        return out.detach().float().cpu()

    def backward(self, x: torch.Tensor, out: torch.Tensor,
                 grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(parameter gradient (N,) float32, input gradient or None), both on the CPU."""
        inputs = self._params + ([x] if x.requires_grad else [])
        grads = torch.autograd.grad(out, inputs, grad_outputs=grad.to(self.device, out.dtype), allow_unused=True)
        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                          for g, p in zip(grads, self._params)])  # (N,)
        return flat.cpu(), (grads[-1].detach().float().cpu() if x.requires_grad else None)


__all__ = ["StageCompute"]
