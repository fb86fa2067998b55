"""The FlowMatch sigma grid against diffusers' scheduler (the reference)."""

import numpy as np
import pytest

from rfmpc.flow import flowmatch_sigmas, timesteps_from_sigmas, validate_sigmas

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0, 0.5])
@pytest.mark.parametrize("n", [1, 2, 7, 28, 50, 100])
def test_matches_diffusers(n, shift):
    sch = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    sch.set_timesteps(n)
    ours = np.asarray(flowmatch_sigmas(n, shift))
    ref = sch.sigmas.numpy()
    assert ours.shape == (n + 1,) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-7)
    np.testing.assert_allclose(
        np.asarray(timesteps_from_sigmas(ours)), sch.timesteps.numpy(), rtol=0, atol=1e-4
    )
    assert ours[0] == 1.0 and ours[-1] == 0.0
    assert np.all(np.diff(ours) < 0)


@pytest.mark.parametrize("mu", [0.5, 1.15])
def test_dynamic_shifting_matches_diffusers(mu):
    sch = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sch.set_timesteps(12, mu=mu)
    np.testing.assert_allclose(
        np.asarray(flowmatch_sigmas(12, mu=mu)), sch.sigmas.numpy(), rtol=0, atol=1e-7
    )


def test_endpoint_is_shifted_twice():
    s = 3.0
    sig_min_train = s * 1e-3 / (1 + (s - 1) * 1e-3)
    twice = s * sig_min_train / (1 + (s - 1) * sig_min_train)
    assert abs(float(flowmatch_sigmas(10, s)[-2]) - twice) < 1e-7


@pytest.mark.parametrize("bad", [0, -3])
def test_bad_num_steps(bad):
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        flowmatch_sigmas(bad)


def test_bad_types_and_shift():
    with pytest.raises(TypeError, match="num_steps must be an int"):
        flowmatch_sigmas(2.5)
    with pytest.raises(ValueError, match="shift must be a positive"):
        flowmatch_sigmas(4, shift=-1.0)


def test_validate_sigmas_rejects_non_decreasing():
    with pytest.raises(ValueError, match=r"strictly decreasing.*sigmas\[1\]"):
        validate_sigmas(np.array([1.0, 0.5, 0.5, 0.0]))
    with pytest.raises(ValueError, match="NaN"):
        validate_sigmas(np.array([1.0, np.nan, 0.0]))
    with pytest.raises(ValueError, match="1-D"):
        validate_sigmas(np.ones((2, 2)))
