"""An SD3 MM-DiT as a jitted, pure function of its parameters (:class:`Transformer`).

:func:`load_transformer` loads an rfmpc-format folder written by :func:`save_transformer` /
``rfmpc convert``: it builds the model abstractly (``nnx.eval_shape``), fills it strictly and
returns a :class:`Transformer`: call it like the network, or use :meth:`Transformer.apply` with
explicit parameters for gradients. Diffusers folders are converted on load by
:func:`rfmpc.convert.load_transformer` (either format), one layer up: the models never import
the key maps of ``weights_conversion``.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from rfmpc.models.configs import MMDiTConfig
from rfmpc.models.mmdit import MMDiT
from rfmpc.models.serialization import is_rfmpc_folder, load_model, save_model
from rfmpc.sharding import MIN_SHARD_SIZE, shard_params

__all__ = [
    "CPU_AUTOTUNE_CANDIDATES",
    "CPU_EIGEN_DOTS",
    "CPU_YNN_REDUCTIONS",
    "KIND",
    "Autotuned",
    "Transformer",
    "check_dtype",
    "load_transformer",
    "resolve_folder",
    "save_transformer",
]

#: Kind tag of MM-DiT folders in rfmpc's format.
KIND = "mmdit"


def _apply(graphdef, params, buffers, hidden_states, timestep, encoder_hidden_states, pooled):
    module = nnx.merge(graphdef, params, buffers)
    return module(hidden_states, timestep, encoder_hidden_states, pooled)


class _Structure:
    """The static half of a :class:`Transformer` call: nnx graphdef + treedef of its arrays.

    ``jax.jit`` hashes its static arguments on every call; an nnx ``GraphDef`` of a 4-layer
    MM-DiT takes ~0.7 ms to hash on the 2-core CPU (a real share of a ~20 ms forward), so the
    hash is computed once here. Equality still compares the structures, so equal architectures
    share one compiled executable.
    """

    __slots__ = ("_hash", "graphdef", "treedef")

    def __init__(self, graphdef, treedef):
        self.graphdef = graphdef
        self.treedef = treedef
        self._hash = hash((graphdef, treedef))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        if self is other:
            return True
        if not isinstance(other, _Structure) or self._hash != other._hash:
            return False
        return self.treedef == other.treedef and self.graphdef == other.graphdef


def _apply_flat(structure: _Structure, leaves, hidden_states, timestep, context, pooled):
    params, buffers = jax.tree.unflatten(structure.treedef, leaves)
    return _apply(structure.graphdef, params, buffers, hidden_states, timestep, context, pooled)


# One compiled executable per (architecture, input shapes/dtypes), shared by all instances. The
# parameters travel as a flat list of arrays (flattening an nnx.State costs ~0.15 ms a call).
_apply_jit = jax.jit(_apply_flat, static_argnums=0)

#: XLA:CPU with its XNNPACK ("YNN") fusions off: dots through Eigen, reductions by XLA's own
#: emitter. Faster on some shapes and CPUs, slower on others (``docs/performance.md``).
CPU_EIGEN_DOTS: dict[str, str] = {"xla_cpu_experimental_ynn_fusion_type": ""}
#: XLA:CPU with YNN fusions for reductions only: dots through Eigen, reductions through YNN.
CPU_YNN_REDUCTIONS: dict[str, str] = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"
}
#: What :meth:`Transformer.autotune` tries by default: XLA's defaults and the two above.
CPU_AUTOTUNE_CANDIDATES = (None, CPU_EIGEN_DOTS, CPU_YNN_REDUCTIONS)

CompilerOptions = tuple[tuple[str, str | bool | int | float], ...]


def _options_key(options) -> CompilerOptions:
    """``options`` (a mapping of XLA flag names to values) as a sorted, hashable tuple."""
    if options is None:
        return ()
    try:
        items = dict(options).items()
    except (TypeError, ValueError):
        raise TypeError(
            "compiler_options must be a mapping of XLA option names to values, e.g. "
            f"{CPU_EIGEN_DOTS}, got {type(options).__name__}"
        ) from None
    for k, v in items:
        if not isinstance(k, str) or not isinstance(v, str | bool | int | float):
            raise TypeError(
                f"compiler_options: {k!r}: {v!r} is not a str name with a str, bool, int or "
                "float value"
            )
    return tuple(sorted(items))


@functools.cache
def _jit_with(options: CompilerOptions):
    """The jitted forward compiled with XLA ``options`` (``()``: XLA's defaults)."""
    if not options:
        return _apply_jit
    return jax.jit(_apply_flat, static_argnums=0, compiler_options=dict(options))


class Autotuned(NamedTuple):
    """What :meth:`Transformer.autotune` found.

    Attributes:
        model: the :class:`Transformer` with the fastest compiler options.
        options: those options (a sorted tuple of pairs; ``()``: XLA's defaults).
        median_s: median seconds per call of each candidate that compiled, by its options.
        failed: the reason each candidate that did not compile failed, by its options.
    """

    model: Transformer
    options: CompilerOptions
    median_s: dict
    failed: dict


@jax.tree_util.register_pytree_node_class
class Transformer:
    """A loaded MM-DiT: ``model(hidden_states_nhwc, timestep, encoder_hidden_states, pooled)``.

    Calling it runs a ``jax.jit``-compiled forward (compiled once per input shape). It is a
    pytree (leaves: ``params`` and ``buffers``), so it can be passed into jitted functions.

    ``compiler_options`` (XLA flags for the jitted call, e.g. :data:`CPU_EIGEN_DOTS`) change
    how the call is compiled, never what it computes; :meth:`autotune` picks them by timing.

    To change the weights, assign new states (``model.params = new_params``, as loaders, sharding
    and ``jax.tree.map`` over the pytree do): the flattened weights are cached per ``params`` /
    ``buffers`` object, so mutating those states in place is not seen by later calls.

    Attributes:
        config: the :class:`~rfmpc.models.configs.MMDiTConfig`.
        module: the nnx :class:`~rfmpc.models.mmdit.MMDiT` (shares arrays with ``params``).
        graphdef: its nnx graph definition (static structure).
        params: ``nnx.State`` of the trainable parameters (``nnx.Param``).
        buffers: ``nnx.State`` of the other variables (the position table).
        compiler_options: the XLA options of the jitted call, a sorted tuple of pairs (``()``:
            XLA's defaults).
    """

    def __init__(self, graphdef, params, buffers, config: MMDiTConfig, compiler_options=None):
        self.graphdef = graphdef
        self.params = params
        self.buffers = buffers
        self.config = config
        self.compiler_options = _options_key(compiler_options)
        self._jit = _jit_with(self.compiler_options)
        self._flat = None  # (params, buffers, _Structure, leaves) of the last call

    def _flat_arguments(self) -> tuple[_Structure, list]:
        """Static structure and flat leaves of ``(params, buffers)``, cached while both are the
        same objects (replace ``params``/``buffers`` to change weights; do not mutate them)."""
        flat = self._flat
        if flat is None or flat[0] is not self.params or flat[1] is not self.buffers:
            leaves, treedef = jax.tree.flatten((self.params, self.buffers))
            flat = (self.params, self.buffers, _Structure(self.graphdef, treedef), leaves)
            self._flat = flat
        return flat[2], flat[3]

    @classmethod
    def from_module(cls, module: MMDiT) -> Transformer:
        graphdef, params, buffers = nnx.split(module, nnx.Param, ...)
        return cls(graphdef, params, buffers, module.config)

    @property
    def module(self) -> MMDiT:
        return nnx.merge(self.graphdef, self.params, self.buffers)

    @property
    def dtype(self):
        return self.module.dtype

    def apply(
        self,
        params,
        hidden_states: Float[Array, "b h w c"],
        timestep: Float[Array, " b"] | float,
        encoder_hidden_states: Float[Array, "b m j"],
        pooled_projections: Float[Array, "b p"],
        *,
        buffers=None,
    ) -> Float[Array, "b h w o"]:
        """Pure forward with explicit ``params`` (not jitted: use it inside ``jax.grad``/``jit``).

        ``buffers`` defaults to this model's (pass them explicitly in jitted code to avoid
        capturing the position table as a constant).
        """
        buffers = self.buffers if buffers is None else buffers
        return _apply(
            self.graphdef,
            params,
            buffers,
            hidden_states,
            timestep,
            encoder_hidden_states,
            pooled_projections,
        )

    def __call__(
        self,
        hidden_states: Float[Array, "b h w c"],
        timestep: Float[Array, " b"] | float,
        encoder_hidden_states: Float[Array, "b m j"],
        pooled_projections: Float[Array, "b p"],
    ) -> Float[Array, "b h w o"]:
        """Velocity at ``timestep = sigma * 1000`` (scalar or ``(b,)``), NHWC in and out."""
        # Scalars and (b,) arrays share one executable: broadcast before the jit boundary (in
        # numpy when the timestep is on the host: an eager jnp op costs tens of microseconds).
        xp = np if isinstance(timestep, int | float | np.ndarray | np.generic) else jnp
        timestep = xp.asarray(timestep, np.float32)
        if timestep.ndim == 0 and hidden_states.ndim >= 1:
            timestep = xp.broadcast_to(timestep, hidden_states.shape[:1])
        structure, leaves = self._flat_arguments()
        return self._jit(
            structure,
            leaves,
            hidden_states,
            timestep,
            encoder_hidden_states,
            pooled_projections,
        )

    def astype(self, dtype, *, attention: str = "auto") -> Transformer:
        """The same weights with parameter and compute dtype ``dtype`` (a new ``Transformer``).

        Used to run the control code (shooting gradients, MPC Jacobian probes) in float32 on a
        model loaded in bfloat16: the weights are the bf16-rounded values, upcast exactly, and
        every matmul then runs in float32 (see ``docs/performance.md`` for the measured deltas).
        """
        dtype = check_dtype(dtype)
        if dtype == jnp.dtype(self.dtype):
            return self
        abstract = nnx.eval_shape(
            lambda: MMDiT(
                self.config, dtype=dtype, param_dtype=dtype, attention=attention, rngs=nnx.Rngs(0)
            )
        )
        graphdef, _, _ = nnx.split(abstract, nnx.Param, ...)
        cast = lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a
        return Transformer(
            graphdef,
            jax.tree.map(cast, self.params),
            jax.tree.map(cast, self.buffers),
            self.config,
            self.compiler_options,
        )

    def shard(self, mesh, *, min_size: int = MIN_SHARD_SIZE) -> Transformer:
        """A copy with its parameters and buffers placed on ``mesh`` by the FSDP rule
        (:func:`rfmpc.sharding.shard_params`); implements :class:`rfmpc.sharding.Shardable`."""
        return shard_params(self, mesh, min_size=min_size)

    def with_compiler_options(self, options) -> Transformer:
        """The same weights, called through a jit compiled with XLA ``options`` (a mapping of
        option names to values; ``None`` or ``{}``: XLA's defaults). Values are unchanged up
        to the floating-point order the compiler picks."""
        return Transformer(self.graphdef, self.params, self.buffers, self.config, options)

    def autotune(
        self,
        hidden_states: Float[Array, "b h w c"],
        timestep: Float[Array, " b"] | float,
        encoder_hidden_states: Float[Array, "b m j"],
        pooled_projections: Float[Array, "b p"],
        *,
        candidates=CPU_AUTOTUNE_CANDIDATES,
        runs: int = 7,
        settle_s: float = 0.3,
    ) -> Autotuned:
        """Time the call compiled with each of ``candidates`` (XLA option mappings; ``None``:
        the defaults) on these inputs and return the fastest as an :class:`Autotuned`.

        Each candidate is compiled and called once, all are called round-robin untimed for
        ``settle_s`` seconds, then timed round-robin, ``runs`` rounds of two back-to-back calls
        each, the second timed (the first absorbs the slower call that follows a switch); the
        median decides. A candidate that does not compile is reported in ``Autotuned.failed``
        and skipped. Costs one compile per candidate, ``settle_s`` seconds and ``2 * runs``
        forwards each; the choice holds for these shapes on this machine (re-tune for others).
        Call it outside ``jax.jit``.
        """
        if runs < 1:
            raise ValueError(f"autotune: runs must be >= 1, got {runs}")
        if not settle_s >= 0:
            raise ValueError(f"autotune: settle_s must be >= 0 seconds, got {settle_s}")
        keys = list(dict.fromkeys(_options_key(c) for c in candidates))
        if not keys:
            raise ValueError("autotune: candidates is empty; pass at least None (XLA defaults)")
        args = (hidden_states, timestep, encoder_hidden_states, pooled_projections)
        if any(isinstance(a, jax.core.Tracer) for a in args):
            raise TypeError("autotune times real calls: call it outside jax.jit / jax.grad")
        models, failed = {}, {}
        for key in keys:
            m = self.with_compiler_options(key)
            try:
                jax.block_until_ready(m(*args))
            except Exception as e:
                if not key:  # XLA's defaults failing is the inputs' fault: say so as is
                    raise
                failed[key] = f"{type(e).__name__}: {e}"
                continue
            models[key] = m
        if not models:
            raise RuntimeError(f"autotune: no candidate compiled: {failed}")
        # Untimed calls for ``settle_s``: after an idle spell (here: the compiles) XLA:CPU's
        # next calls run slower for a while (~9 calls, 1.5x, after 1 s idle on the 2-core CPU).
        t_end = time.perf_counter() + settle_s
        while time.perf_counter() < t_end:
            for m in models.values():
                jax.block_until_ready(m(*args))
        times = {k: [] for k in models}
        for _ in range(runs):
            for k, m in models.items():
                jax.block_until_ready(m(*args))
                t0 = time.perf_counter()
                jax.block_until_ready(m(*args))
                times[k].append(time.perf_counter() - t0)
        median = {k: float(np.median(t)) for k, t in times.items()}
        best = min(median, key=median.get)
        return Autotuned(models[best], best, median, failed)

    def tree_flatten(self):
        return (self.params, self.buffers), (self.graphdef, self.config, self.compiler_options)

    @classmethod
    def tree_unflatten(cls, aux, children):
        graphdef, config, options = aux
        params, buffers = children
        return cls(graphdef, params, buffers, config, options)

    def __repr__(self) -> str:
        n = sum(x.size for x in jax.tree.leaves(self.params))
        return f"Transformer({self.config}, params={n:,})"


def resolve_folder(folder: Path) -> Path:
    """``folder``, or its ``transformer/`` subfolder if it is a whole pipeline folder."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a directory; pass a transformer model folder")
    if (folder / "model_index.json").is_file() and (folder / "transformer").is_dir():
        return folder / "transformer"
    return folder


def check_dtype(dtype) -> jnp.dtype:
    """``dtype`` as a ``jnp.dtype`` if it is float32, bfloat16 or float16 (else ``ValueError``)."""
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    return dtype


def load_transformer(
    folder: str | os.PathLike, dtype=jnp.float32, *, attention: str = "auto"
) -> Transformer:
    """Load an MM-DiT saved in rfmpc's format (:func:`save_transformer` / ``rfmpc convert``).

    Args:
        folder: an rfmpc-format transformer folder, or a converted pipeline folder (its
            ``transformer/`` subfolder is used).
        dtype: parameter and compute dtype (``jnp.float32`` or ``jnp.bfloat16``; LayerNorms,
            softmax, residual streams and adaLN modulation stay float32 either way).
        attention: ``"auto"`` (cuDNN flash attention for half precision on GPU, else XLA),
            ``"xla"`` or ``"cudnn"``.

    Returns a :class:`Transformer`. A diffusers folder needs its key map, which lives outside the
    models (``weights_conversion``): load it with :func:`rfmpc.convert.load_transformer` (either
    format) or convert it once with ``rfmpc convert``; this function raises ``ValueError``
    saying so. Raises :class:`~rfmpc.weights_io.WeightLoadError` on any missing, extra or
    mis-shaped key, and ``ValueError`` on an unsupported config.
    """
    dtype = check_dtype(dtype)
    folder = resolve_folder(Path(folder))
    if not is_rfmpc_folder(folder):
        raise ValueError(
            f"{folder} is not an rfmpc-format transformer folder (a diffusers one?): load it "
            "with rfmpc.convert.load_transformer, which converts diffusers folders on load, or "
            "convert it once with `rfmpc convert`"
        )

    def build(cfg):
        config = MMDiTConfig.from_diffusers(cfg)
        return MMDiT(config, dtype=dtype, param_dtype=dtype, attention=attention, rngs=nnx.Rngs(0))

    module, _ = load_model(folder, build, kind=KIND)
    return Transformer.from_module(module)


def save_transformer(model: Transformer | MMDiT, folder: str | os.PathLike) -> Path:
    """Save an MM-DiT in rfmpc's format (``config.json`` + ``model.safetensors``)."""
    module = model.module if isinstance(model, Transformer) else model
    if not isinstance(module, MMDiT):
        raise TypeError(f"model must be a Transformer or MMDiT, got {type(model).__name__}")
    return save_model(module, folder, module.config.to_diffusers(), kind=KIND)
