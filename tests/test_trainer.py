"""The federated round's math on one node: outer optimizers and the local inner loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from node.jobs.federated.local_training import LocalTrainer, OuterOptimizer, make_inner_optimizer, pseudo_gradient
from protocol.allreduce.sparsify import SparseUpdate

N = 257


def vec(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(N, dtype=np.float32)


def test_fedavg_with_lr_1_gives_the_mean_of_the_local_models():
    start = vec(0)
    locals_ = [vec(i) for i in range(1, 5)]
    mean_delta = np.mean([pseudo_gradient(start, local) for local in locals_], axis=0, dtype=np.float32)
    new = OuterOptimizer("fedavg", N, lr=1.0).step(start, mean_delta)
    np.testing.assert_allclose(new, np.mean(locals_, axis=0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_outer_step_matches_torch_sgd(nesterov):
    lr, momentum = 0.7, 0.9  # DiLoCo's outer setting
    ours = OuterOptimizer("diloco", N, lr=lr, momentum=momentum, nesterov=nesterov)
    p = torch.nn.Parameter(torch.from_numpy(vec(0).copy()))
    ref = torch.optim.SGD([p], lr=lr, momentum=momentum, nesterov=nesterov)
    params = vec(0)
    for r in range(5):
        g = vec(10 + r)
        params = ours.step(params, g)
        p.grad = torch.from_numpy(g.copy())
        ref.step()
    np.testing.assert_allclose(params, p.detach().numpy(), rtol=1e-5, atol=1e-5)


def test_outer_step_is_bit_identical_across_replicas_and_accepts_sparse_updates():
    idx = np.array([3, 50, 200], np.int64)
    update = SparseUpdate(idx, np.array([0.5, -1.0, 2.0], np.float32), N)
    a, b = (OuterOptimizer("diloco", N, lr=0.7, momentum=0.9, nesterov=True) for _ in range(2))
    pa = pb = vec(1)
    for _ in range(3):
        pa, pb = a.step(pa, update), b.step(pb, update.to_dense())
    assert pa.tobytes() == pb.tobytes()
    c = OuterOptimizer("diloco", N, lr=0.7, momentum=0.9, nesterov=True)
    c.load_state(a.state())  # a joiner that downloads the momentum continues identically
    assert c.step(pa, update).tobytes() == a.step(pa, update).tobytes()


@pytest.mark.parametrize("kwargs, needle", [
    (dict(kind="adam"), "outer optimizer"), (dict(lr=0.0), "lr"), (dict(lr=float("nan")), "lr"),
    (dict(momentum=1.0), "momentum"),
])
def test_outer_optimizer_rejects_bad_settings(kwargs, needle):
    args = dict(kind="fedavg", size=N, lr=1.0, momentum=0.0) | kwargs
    with pytest.raises(ValueError, match=needle):
        OuterOptimizer(**args)


def test_outer_state_mismatch_is_refused():
    with pytest.raises(ValueError, match="momentum"):
        OuterOptimizer("fedavg", N).load_state(np.zeros(N, np.float32))
    with pytest.raises(ValueError, match="finite"):
        OuterOptimizer("diloco", N, momentum=0.9).load_state(np.full(N, np.nan, np.float32))


class _Linear:
    """A minimal ModelBundle stand-in's loss: a real torch module and a real cross-entropy."""

    def __init__(self):
        torch.manual_seed(0)
        self.module = torch.nn.Linear(4, 3)

    def loss(self, model, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y)


def _batches(bad_at: int | None = None):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3))
    i = 0
    while True:
        x = rng.standard_normal((16, 4)).astype(np.float32)
        if i == bad_at:
            x[0, 0] = np.nan
        yield torch.from_numpy(x), torch.from_numpy((x @ w).argmax(axis=1))
        i += 1


def test_local_training_lowers_the_loss_and_counts_samples():
    from node.ml.models import flatten_params

    bundle = _Linear()
    start = flatten_params(bundle.module)
    trainer = LocalTrainer(bundle, make_inner_optimizer(bundle.module, "sgd", lr=0.5), _batches())
    first = trainer.run(start, 5)
    later = trainer.run(first.params, 50)
    assert first.finite and first.samples == 80 and later.mean_loss < first.mean_loss
    assert np.abs(pseudo_gradient(start, first.params)).sum() > 0


def test_nan_loss_marks_the_update_unsendable_and_keeps_the_start():
    from node.ml.models import flatten_params

    bundle = _Linear()
    start = flatten_params(bundle.module)
    trainer = LocalTrainer(bundle, make_inner_optimizer(bundle.module, "adamw", lr=0.01), _batches(bad_at=2))
    result = trainer.run(start, 5)
    assert not result.finite and np.isnan(result.mean_loss)
    assert result.params.tobytes() == start.tobytes()
