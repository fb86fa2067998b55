"""The MPC-Flow authors' hexagon field and experiment: rfmpc against their algorithm in PyTorch.

The reference below is a PyTorch transcription of the algorithm the authors' ``2DHexagon``
scripts describe (Euler in ``t`` from 0 to 1, Adam on the controls, receding horizon on
``linspace(t_i, 1, K + 1)`` with shifted warm starts), run on the same weights; rfmpc runs it in
its own convention through diffrax. Short settings (20 steps, 30 inner iterations) keep it fast;
the algorithm is the same at the published 100 / 200.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from rfmpc.inverse.hexagon import (
    HEXAGON_WEIGHTS,
    delta_t_horizon,
    global_control,
    hexagon_corners,
    hexagon_field,
    load_hexagon_mlp,
    receding_horizon,
    uncontrolled,
)

torch = pytest.importorskip("torch")

X0 = (-0.75, -0.5)
TARGET = hexagon_corners()[-1]
TW, CW = 0.075, 0.001


def _torch_mlp():
    from rfmpc.io import load_safetensors

    tensors, _ = load_safetensors(HEXAGON_WEIGHTS)
    layers = []
    for i in range(5):
        lin = torch.nn.Linear(*reversed(tensors[f"main.{2 * i}.weight"].shape))
        lin.weight.data = torch.from_numpy(np.array(tensors[f"main.{2 * i}.weight"]))
        lin.bias.data = torch.from_numpy(np.array(tensors[f"main.{2 * i}.bias"]))
        layers.append(lin)

    def v(x, t):
        h = torch.cat([x, t.reshape(1, 1).expand(x.shape[0], 1)], dim=1)
        for i, lin in enumerate(layers):
            h = lin(h)
            if i < 4:
                h = torch.sigmoid(h) * h
        return h

    return v


def _euler(v, u, x, ts):
    energy = 0.0
    for i in range(ts.shape[0] - 1):
        dt = ts[i + 1] - ts[i]
        x = x + dt * (v(x, ts[i]) + u[i])
        energy = energy + torch.sum(u[i] ** 2) * dt
    return x, energy


def _torch_rhc(k: int, n: int, iters: int):
    v = _torch_mlp()
    target = torch.tensor(TARGET, dtype=torch.float32)
    ts = torch.linspace(0, 1, n + 1)
    x = torch.tensor([X0], dtype=torch.float32)
    control = torch.zeros((k, 1, 2))
    applied = []
    for i in range(n):
        if i > 0:
            control = torch.cat([control[1:], torch.zeros((1, 1, 2))], dim=0)
        if k == 1:
            control = torch.zeros((k, 1, 2))
        control = torch.nn.Parameter(control.detach())
        opt = torch.optim.Adam([control], lr=0.1)
        sub = torch.linspace(float(ts[i]), 1.0, k + 1)
        for _ in range(iters):
            opt.zero_grad()
            xf, energy = _euler(v, control, x, sub)
            loss = CW * energy + TW * 0.5 * torch.sum((xf - target) ** 2)
            loss.backward()
            opt.step()
        with torch.no_grad():
            x = x + (ts[i + 1] - ts[i]) * (v(x, ts[i]) + control[0])
            applied.append(control[0].clone())
    return x.detach().numpy()[0], torch.stack(applied).numpy()


def test_field_matches_the_torch_mlp():
    v = _torch_mlp()
    mlp = load_hexagon_mlp()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 2)).astype(np.float32)
    for t in (0.0, 0.37, 1.0):
        ref = v(torch.from_numpy(x), torch.tensor(t)).detach().numpy()
        np.testing.assert_allclose(np.asarray(mlp(jnp.asarray(x), t)), ref, atol=2e-6)
        # rfmpc's convention: v_rfmpc(x, sigma) = -v(x, 1 - sigma)
        got = hexagon_field(mlp)(jnp.asarray(x), 1.0 - t)
        np.testing.assert_allclose(np.asarray(got), -ref, atol=2e-6)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_receding_horizon_equals_the_authors_algorithm(k):
    n, iters = 20, 30
    ref_x, ref_u = _torch_rhc(k, n, iters)
    ours = receding_horizon(hexagon_field(), k, X0, TARGET, num_steps=n, iters=iters)
    np.testing.assert_allclose(np.asarray(ours.x_T), ref_x, atol=2e-4)
    np.testing.assert_allclose(np.asarray(ours.controls), ref_u, atol=2e-3)


def test_global_control_and_delta_t_reach_the_corner():
    field = hexagon_field()
    free = uncontrolled(field, X0, TARGET, num_steps=50)
    glob = global_control(field, X0, TARGET, num_steps=50, iters=600)
    dt = delta_t_horizon(field, X0, TARGET, num_steps=50, iters=50)
    assert float(glob.terminal) < 0.1 * float(free.terminal)
    assert float(dt.terminal) < 0.5 * float(free.terminal)
    assert float(glob.control) > 0 and float(dt.control) > 0
    with pytest.raises(ValueError, match=r"k .* must be an int >= 1"):
        receding_horizon(field, 0)
