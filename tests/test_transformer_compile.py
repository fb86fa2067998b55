"""``Transformer`` compiler options: they change how the jitted call is compiled, never its
values; they survive the pytree round trip and ``astype``; ``autotune`` times real calls and
returns the fastest candidate, skipping (and reporting) candidates that do not compile."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _models import tiny_mmdit_pipeline

from rfmpc.models import CPU_EIGEN_DOTS, Autotuned, Transformer


@pytest.fixture(scope="module")
def model_and_args():
    model = tiny_mmdit_pipeline(16).transformer
    rng = np.random.default_rng(0)
    args = (
        jnp.asarray(rng.standard_normal((2, 16, 16, 3)), jnp.float32),
        jnp.asarray([900.0, 120.0], jnp.float32),
        jnp.asarray(rng.standard_normal((2, 4, 8)), jnp.float32),
        jnp.asarray(rng.standard_normal((2, 8)), jnp.float32),
    )
    return model, args


def test_options_change_compilation_not_values(model_and_args):
    model, args = model_and_args
    eigen = model.with_compiler_options(CPU_EIGEN_DOTS)
    assert eigen.compiler_options == (("xla_cpu_experimental_ynn_fusion_type", ""),)
    assert eigen.params is model.params and model.compiler_options == ()
    np.testing.assert_allclose(
        np.asarray(eigen(*args)), np.asarray(model(*args)), rtol=1e-5, atol=1e-6
    )
    # a pytree round trip (jax.tree.map, sharding, passing through jit) keeps the options
    again = jax.tree.map(lambda a: a, eigen)
    assert isinstance(again, Transformer) and again.compiler_options == eigen.compiler_options
    assert eigen.astype(jnp.bfloat16).compiler_options == eigen.compiler_options
    assert model.with_compiler_options({}).compiler_options == ()


@pytest.mark.parametrize(
    "bad, match",
    [([1, 2], "mapping of XLA option names"), ({"xla_flag": [1]}, "not a str name with")],
)
def test_bad_options_say_what_is_expected(model_and_args, bad, match):
    with pytest.raises(TypeError, match=match):
        model_and_args[0].with_compiler_options(bad)


def test_autotune_picks_the_fastest_that_compiles(model_and_args):
    model, args = model_and_args
    bogus = {"xla_no_such_option_anywhere": True}
    r = model.autotune(*args, candidates=(None, CPU_EIGEN_DOTS, bogus), runs=2)
    assert isinstance(r, Autotuned)
    key = lambda d: tuple(sorted(d.items()))
    assert set(r.median_s) == {(), key(CPU_EIGEN_DOTS)}
    assert set(r.failed) == {key(bogus)} and "xla_no_such_option_anywhere" in r.failed[key(bogus)]
    assert r.options == min(r.median_s, key=r.median_s.get)
    assert r.model.compiler_options == r.options and all(t > 0 for t in r.median_s.values())
    np.testing.assert_allclose(
        np.asarray(r.model(*args)), np.asarray(model(*args)), rtol=1e-5, atol=1e-6
    )


def test_autotune_rejects_what_it_cannot_time(model_and_args):
    model, args = model_and_args
    with pytest.raises(ValueError, match="runs must be >= 1"):
        model.autotune(*args, runs=0)
    with pytest.raises(ValueError, match="candidates is empty"):
        model.autotune(*args, candidates=())
    with pytest.raises(TypeError, match=r"outside jax\.jit"):
        jax.jit(lambda x: model.autotune(x, *args[1:]).median_s[()])(args[0])
