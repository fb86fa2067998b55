"""Multi-device and multi-host runs with JAX's own SPMD (``jax.sharding``), no custom engine.

Model-free: this module knows meshes, arrays and pytrees, never a model class. A component that
holds weights (:class:`rfmpc.models.Transformer`, the pipeline's codecs and text encoders)
declares how it is placed on a mesh with a ``shard(mesh, *, min_size)`` method (the
:class:`Shardable` protocol), built on :func:`shard_params`; :meth:`rfmpc.pipeline.Pipeline.shard`
asks each of its components in turn.

A :class:`jax.sharding.Mesh` with two named axes places the work:

* ``"data"`` (:data:`DATA`): data parallelism over the *batch* -- prompts (and their CFG pairs,
  which the pipeline concatenates on the batch axis), prompt pairs of :func:`switch_batch
  <rfmpc.control.switch_batch>`, images of an inverse problem. Batch arrays are split on their
  leading axis over this axis.
* ``"fsdp"`` (:data:`FSDP`): FSDP-style (ZeRO-3) parameter sharding for models that do not fit
  one device. Parameters are split over this axis and XLA all-gathers them where they are used.

**The parameter rule** (:func:`param_spec`): a parameter with at least ``min_size`` elements
(default :data:`MIN_SHARD_SIZE` = 2**16) is split over ``"fsdp"`` along *one* axis: its largest
axis whose length the ``"fsdp"`` size divides (ties: the leading-most such axis). Smaller
parameters (biases, norms, scalars) and parameters with no divisible axis are replicated. Every
parameter is replicated over ``"data"``. With ``fsdp = 1`` everything is replicated (pure data
parallelism).

**The batch rule** (:func:`shard_batch`): the leading (batch) axis must be a multiple of the
``"data"`` axis size, otherwise a ``ValueError`` names the batch size and the axis size. Nothing
is padded silently: some solvers couple the images of a batch (an L-BFGS line search on the
summed loss), so a padded copy would change the others' results. Pad yourself (e.g. repeat a
prompt) and drop the extra outputs, or pick a mesh whose ``"data"`` size divides the batch.

Within a jitted function the computation follows its inputs' shardings (GSPMD);
:class:`BatchShardedField` additionally pins a velocity field's input and output to the batch
sharding, so the solvers' loops stay data parallel whatever XLA's propagation would choose.

**Multi-host**: call :func:`initialize_distributed` first in every process (before any other JAX
call); :func:`make_mesh` then spans the devices of all hosts. Every process runs the same program
with the same inputs (same prompts, same seeds): :func:`shard_batch` / :func:`shard_params` build
global arrays from each host's full copy, and :func:`gather` brings a result back to every host.

Typical use::

    mesh = make_mesh(data=4, fsdp=2)              # 8 devices
    pipe = load_pipeline(folder, mesh=mesh)       # Pipeline.shard: each component shards itself
    out = pipe(prompts, seed=0)                   # batch of 4k prompts split over "data"
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array

__all__ = [
    "DATA",
    "FSDP",
    "MIN_SHARD_SIZE",
    "BatchShardedField",
    "Shardable",
    "batch_sharding",
    "check_mesh",
    "gather",
    "initialize_distributed",
    "make_mesh",
    "param_spec",
    "replicate",
    "shard_batch",
    "shard_params",
]

#: Name of the data-parallel (batch) mesh axis.
DATA = "data"
#: Name of the parameter-sharding (FSDP) mesh axis.
FSDP = "fsdp"
#: Parameters with fewer elements than this are replicated (2**16 = 256 KiB in float32).
MIN_SHARD_SIZE = 1 << 16


# ----------------------------------------------------------------------------- the mesh
def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def make_mesh(
    data: int | None = None, fsdp: int = 1, *, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (default: all devices of all processes).

    Args:
        data: size of the ``"data"`` axis (batch parallelism); default ``len(devices) // fsdp``.
        fsdp: size of the ``"fsdp"`` axis (parameter sharding); default 1.
        devices: the devices to use (default ``jax.devices()``).

    Raises ``ValueError`` if a size is not a positive int or ``data * fsdp`` differs from the
    number of devices (every device must be used exactly once).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if n == 0:
        raise ValueError("devices is empty; pass at least one device")
    fsdp = _positive_int(fsdp, "fsdp")
    if data is None:
        if n % fsdp:
            raise ValueError(
                f"fsdp={fsdp} does not divide the {n} device(s); choose an fsdp size that does"
            )
        data = n // fsdp
    data = _positive_int(data, "data")
    if data * fsdp != n:
        raise ValueError(
            f"mesh shape data={data} x fsdp={fsdp} = {data * fsdp} devices, but {n} device(s) "
            "are available; the product must equal the device count (pass devices= to use a "
            "subset)"
        )
    return jax.make_mesh(
        (data, fsdp), (DATA, FSDP), axis_types=(AxisType.Auto, AxisType.Auto), devices=devices
    )


def check_mesh(mesh: Any, *axes: str) -> Mesh:
    """Return ``mesh`` if it is a :class:`~jax.sharding.Mesh` with the named ``axes``.

    Raises ``TypeError`` for a non-mesh and ``ValueError`` naming the missing axes and the
    mesh's own (a mesh built by hand must use the names :data:`DATA` / :data:`FSDP`).
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (see make_mesh), got {type(mesh)}")
    missing = [a for a in axes if a not in mesh.axis_names]
    if missing:
        raise ValueError(
            f"mesh has axes {tuple(mesh.axis_names)}, not {missing}; build it with "
            f"rfmpc.sharding.make_mesh or name its axes {DATA!r} and {FSDP!r}"
        )
    return mesh


def _axis_size(mesh: Mesh, axis: str) -> int:
    check_mesh(mesh, axis)
    return int(mesh.shape[axis])


def batch_sharding(mesh: Mesh, axis: str = DATA) -> NamedSharding:
    """The sharding of a batch array: leading axis split over ``axis``, the rest replicated."""
    check_mesh(mesh, axis)
    return NamedSharding(mesh, PartitionSpec(axis))


# ----------------------------------------------------------------------------- placement
def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _put(x, sharding: NamedSharding):
    """``x`` as a global array with ``sharding`` (single- and multi-process)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)  # already global: reshard
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    if _is_key(x):  # multi-host keys: place their raw data, re-wrap
        impl = jax.random.key_impl(x)
        data = jax.random.key_data(x)
        spec = PartitionSpec(*sharding.spec, *([None] * (data.ndim - x.ndim)))
        return jax.random.wrap_key_data(_put(data, NamedSharding(sharding.mesh, spec)), impl=impl)
    arr = np.asarray(x)  # every process holds the full value
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


def _array_leaf(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray))


def shard_batch(tree: Any, mesh: Mesh, *, axis: str = DATA) -> Any:
    """Split the leading (batch) axis of every array leaf of ``tree`` over the mesh ``axis``.

    Args:
        tree: a pytree of arrays whose leaves all have a leading batch axis ``(b, ...)``
            (``None`` and non-array leaves are returned unchanged); PRNG key arrays work too.
        mesh: a mesh with ``axis`` (:func:`make_mesh`).
        axis: the data-parallel axis name (default ``"data"``).

    Returns the same tree with each array placed as a global ``jax.Array`` sharded
    ``PartitionSpec(axis)``. Raises ``ValueError`` for a scalar leaf or a batch size that is not a
    multiple of the axis size (nothing is padded; see the module docstring).
    """
    size = _axis_size(mesh, axis)
    sharding = NamedSharding(mesh, PartitionSpec(axis))

    def one(path, x):
        if not _array_leaf(x):
            return x
        if x.ndim == 0:
            raise ValueError(
                f"shard_batch: leaf {jax.tree_util.keystr(path) or '<root>'} is a scalar; every "
                "leaf needs a leading batch axis"
            )
        if x.shape[0] % size:
            raise ValueError(
                f"batch size {x.shape[0]} (leaf {jax.tree_util.keystr(path) or '<root>'}, shape "
                f"{tuple(x.shape)}) is not a multiple of the {axis!r} mesh axis size {size}; pad "
                f"the batch to a multiple of {size} or use a mesh whose {axis!r} size divides it"
            )
        return _put(x, sharding)

    return jax.tree_util.tree_map_with_path(one, tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every array leaf of ``tree`` on all devices of ``mesh`` (fully replicated)."""
    check_mesh(mesh)
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: _put(x, sharding) if _array_leaf(x) else x, tree)


def param_spec(
    shape: Sequence[int], fsdp_size: int, *, min_size: int = MIN_SHARD_SIZE, axis: str = FSDP
) -> PartitionSpec:
    """The :class:`PartitionSpec` of a parameter of ``shape`` under the FSDP rule.

    Split over ``axis`` along the largest dimension that ``fsdp_size`` divides (ties: the
    leading-most) if the parameter has at least ``min_size`` elements and ``fsdp_size > 1``;
    otherwise replicated (``PartitionSpec()``). E.g. with ``fsdp_size=4``: ``(2432, 9728)`` ->
    ``P(None, "fsdp")``; ``(2432,)`` -> ``P()`` (small); ``(3, 3, 5, 7)`` -> ``P()``.
    """
    fsdp_size = _positive_int(fsdp_size, "fsdp_size")
    shape = tuple(int(s) for s in shape)
    if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    best = None
    for i, n in enumerate(shape):
        if n % fsdp_size == 0 and (best is None or n > shape[best]):
            best = i
    if best is None:
        return PartitionSpec()
    return PartitionSpec(*[axis if i == best else None for i in range(len(shape))])


def shard_params(
    params: Any, mesh: Mesh, *, min_size: int = MIN_SHARD_SIZE, axis: str = FSDP
) -> Any:
    """Place a parameter pytree on ``mesh`` by the FSDP rule of :func:`param_spec`.

    Args:
        params: any pytree of arrays (an ``nnx.State``, a dict, a :class:`Transformer`...);
            non-array leaves are returned unchanged.
        mesh: a mesh with the ``axis`` axis (:func:`make_mesh`; ``fsdp=1`` replicates all).
        min_size: parameters with fewer elements are replicated.
        axis: the parameter-sharding axis name (default ``"fsdp"``).

    Returns the same tree with every array a global ``jax.Array`` (sharded or replicated; all
    replicated over the other mesh axes). Each device then holds about ``1/fsdp`` of the large
    parameters.
    """
    size = _axis_size(mesh, axis)

    def one(x):
        if not _array_leaf(x):
            return x
        spec = param_spec(x.shape, size, min_size=min_size, axis=axis)
        return _put(x, NamedSharding(mesh, spec))

    return jax.tree.map(one, params)


def gather(x: Any) -> Any:
    """Every array leaf of ``x`` as a fully addressable value on this process.

    Single-process arrays are returned unchanged (``np.asarray`` works on them); arrays spanning
    several hosts are all-gathered (``multihost_utils.process_allgather``) into NumPy arrays.
    """

    def one(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            from jax.experimental import multihost_utils

            return multihost_utils.process_allgather(a, tiled=True)
        return a

    return jax.tree.map(one, x)


# ----------------------------------------------------------------------------- components
@runtime_checkable
class Shardable(Protocol):
    """A component that places its own weights on a mesh (declared, not probed).

    ``shard(mesh, *, min_size)`` returns a copy whose arrays are placed by the FSDP rule of
    :func:`shard_params` (or the object itself when it holds nothing worth placing); the original
    is not modified. :meth:`rfmpc.pipeline.Pipeline.shard` calls it on each component.
    """

    def shard(self, mesh: Mesh, *, min_size: int = MIN_SHARD_SIZE) -> Any: ...


# ----------------------------------------------------------------------------- fields
class BatchShardedField(eqx.Module):
    """``field`` with its input ``x`` and output pinned to the batch sharding of ``mesh``.

    ``v(x, sigma, cond)`` with ``x`` of shape ``(b, ...)``: both ``x`` and the returned velocity
    are constrained (``jax.lax.with_sharding_constraint``) to ``PartitionSpec("data")``, so the
    model runs data parallel inside any jitted solver loop. The values are unchanged. An
    ``equinox.Module``: the wrapped model's parameters stay traced pytree leaves.
    """

    field: Any
    sharding: NamedSharding = eqx.field(static=True)

    def __init__(self, field, mesh: Mesh, axis: str = DATA):
        if not callable(field):
            raise TypeError(f"field must be a velocity field v(x, sigma, cond), got {type(field)}")
        self.field = field
        self.sharding = batch_sharding(mesh, axis)

    def __call__(self, x: Array, sigma, cond) -> Array:
        x = jax.lax.with_sharding_constraint(x, self.sharding)
        return jax.lax.with_sharding_constraint(self.field(x, sigma, cond), self.sharding)


# ----------------------------------------------------------------------------- multi-host
def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: int | Sequence[int] | None = None,
    **kwargs,
) -> dict[str, int]:
    """Join a multi-process JAX run (``jax.distributed.initialize``); call it first, once.

    Call it in every process before any other JAX call. Under SLURM, Open MPI, Kubernetes or on
    Cloud TPU all arguments may be omitted (JAX detects the cluster); otherwise give all three:

    Args:
        coordinator_address: ``"host:port"`` of process 0, reachable from every process.
        num_processes: the number of processes (>= 1).
        process_id: this process's index in ``[0, num_processes)``.
        local_device_ids: the local devices this process uses (default: all).
        **kwargs: passed on (e.g. ``initialization_timeout``).

    Returns ``{"process_index", "process_count", "local_devices", "global_devices"}``. A second
    call in an initialised process returns the same without re-initialising. Raises
    ``ValueError`` for inconsistent arguments. After it, :func:`make_mesh` spans all hosts.
    """
    given = [a is not None for a in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError(
            "give coordinator_address, num_processes and process_id together (or none of them, "
            "to let JAX detect the cluster)"
        )
    if num_processes is not None:
        num_processes = _positive_int(num_processes, "num_processes")
        if isinstance(process_id, bool) or not isinstance(process_id, int):
            raise ValueError(f"process_id must be an int, got {process_id!r}")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    if not jax.distributed.is_initialized():
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_device_ids,
            **kwargs,
        )
    return {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_devices": jax.local_device_count(),
        "global_devices": jax.device_count(),
    }
