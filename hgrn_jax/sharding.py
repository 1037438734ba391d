"""Device mesh, logical-axis rules, and shardings for model state and batches.

One device, a GPU node, a TPU pod slice and several slices (multislice, see
:meth:`MeshConfig.slice_split`) run the same code: a mesh with axes
``("data", "fsdp", "model")`` (sizes of 1 switch an axis off), parameters named with logical axes
(``embed``, ``rnn``, ``mlp``, ``vocab``, ``layers``, ``classes``; activations ``batch``,
``length``) and :data:`LOGICAL_AXIS_RULES`, the one table that maps logical names to mesh axes.

Typical use (the train loop lives in :mod:`hgrn_jax.training`)::

    mesh = make_mesh(data=-1, fsdp=2, model=1)
    model, optimizer = create_sharded(lambda: make_model_and_optimizer(seed), mesh)
    graphdef, state = nnx.split((model, optimizer))
    state_sh = state_shardings(state, mesh)

    def train_step(state, batch):            # graphdef is static: closed over, not traced
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    step = jax.jit(train_step, in_shardings=(state_sh, batch_sharding(mesh, 2)),
                   out_shardings=(state_sh, replicated(mesh)), donate_argnums=0)
    state, loss = step(state, shard_batch(local_batch, mesh))

Multi-host: call :func:`maybe_initialize_distributed` before anything touches a device; every
process then runs the same program and feeds only its own rows to :func:`shard_batch`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from hgrn_jax.deprecation import HGRNDeprecationWarning

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "model")

MeshAxes = str | tuple[str, ...] | None

# The one table of logical-axis rules. Logical names not listed here are an error (a typo, or a
# new name that needs a rule); ``None`` means replicated.
LOGICAL_AXIS_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("rnn", "model"),
    ("mlp", "model"),
    ("vocab", "model"),
    ("layers", None),
    ("classes", None),
)

# TPU kinds whose per-slice layout may split a physical axis over mesh axes, as jax.make_mesh
# allows for them.
_SPLIT_PHYSICAL_AXES_KINDS = ("TPU v5 lite", "TPU v5e")


# ----------------------------------------------------------------------------------------------
# Mesh
# ----------------------------------------------------------------------------------------------


class MeshSizeError(ValueError):
    """Mesh axis sizes that do not fit the devices: ``problem`` (what is wrong) and ``fix`` (what
    to change), so that a caller with its own settings (the runner's ``config.mesh``) can name
    its own fix."""

    def __init__(self, problem: str, fix: str, *, needs_more_devices: bool = False):
        super().__init__(f"{problem}; {fix}")
        self.problem, self.fix = problem, fix
        self.needs_more_devices = needs_more_devices  # than the run has


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the ``data``, ``fsdp`` and ``model`` mesh axes; one of them may be -1 ("the rest").

    ``data`` replicates parameters and splits the batch; ``fsdp`` splits the batch and also the
    ``embed`` dimension of parameters and optimizer state (ZeRO-3 style); ``model`` splits the
    ``rnn``/``mlp``/``vocab`` dimensions (tensor parallelism).
    """

    data: int = -1
    fsdp: int = 1
    model: int = 1

    def _named(self) -> str:
        return ", ".join(f"{n}={s}" for n, s in zip(MESH_AXES, (self.data, self.fsdp, self.model)))

    def axis_sizes(self, num_devices: int, platform: str | None = None) -> tuple[int, int, int]:
        """The three axis sizes for ``num_devices`` devices, with -1 resolved;
        :class:`MeshSizeError` when they do not fit (on ``platform="cpu"``, too few devices
        name the flag that simulates more)."""
        sizes = (self.data, self.fsdp, self.model)
        named = self._named()
        rest = sizes.count(-1)
        if rest > 1:
            raise MeshSizeError(
                f"mesh ({named}): at most one axis may be -1 (the devices the others leave)",
                "give the others explicit sizes",
            )
        if any(s == 0 or s < -1 for s in sizes):
            raise MeshSizeError(f"mesh ({named}): axis sizes must be positive or -1", "fix them")
        known = math.prod(s for s in sizes if s != -1)
        devices = f"{num_devices} device{'s' if num_devices > 1 else ''}"
        needs = f"mesh ({named}) needs {'a multiple of ' if rest else ''}{known} devices"
        simulate = ""
        if platform == "cpu" and known > num_devices:
            simulate = (
                f"; on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count={known} (set "
                f"before JAX starts) simulates {known} devices"
            )
        if num_devices % known != 0:
            raise MeshSizeError(
                f"{needs} but this run has {devices}",
                f"choose axis sizes whose product divides {num_devices}{simulate}",
                needs_more_devices=known > num_devices,
            )
        if rest:
            sizes = tuple(num_devices // known if s == -1 else s for s in sizes)
        elif known != num_devices:
            raise MeshSizeError(
                f"{needs} but this run has {devices}",
                "set one axis to -1 to use the rest"
                + (f", or pass {known} of them as devices=" if known < num_devices else "")
                + simulate,
                needs_more_devices=known > num_devices,
            )
        return sizes  # type: ignore[return-value]

    def slice_split(
        self, num_slices: int, per_slice: int
    ) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """``(within, across)``: the axis sizes inside one slice and over the slices, for a
        multislice job of ``num_slices`` slices of ``per_slice`` devices; their products are the
        axis sizes (``within[i] * across[i]``).

        The slices go along ``data`` as far as it divides by them (``gcd(data, num_slices)``),
        the rest along ``fsdp``; ``model`` never crosses slices. Only the once-per-step gradient
        all-reduce (``data``) and, where ``data`` cannot take all the slices, the ``fsdp``
        all-gathers cross the slower network; tensor parallelism's every-layer collectives stay
        inside a slice. This fits exactly when ``model`` divides ``per_slice`` (equivalently,
        ``data x fsdp`` is a multiple of ``num_slices``); otherwise :class:`MeshSizeError`.
        """
        data, fsdp, model = self.axis_sizes(num_slices * per_slice)
        on_data = math.gcd(data, num_slices)
        on_fsdp = num_slices // on_data
        # model | per_slice <=> num_slices | data * fsdp, and then on_fsdp (coprime to
        # data / on_data) divides fsdp: the one condition for the split to exist.
        if per_slice % model:
            raise MeshSizeError(
                f"mesh ({self._named()}) on {num_slices} slices of {per_slice} devices: "
                f"model={model} does not fit inside one slice (tensor parallelism must not cross "
                f"slices; "
                f"data x fsdp = {data} x {fsdp} is not a multiple of {num_slices} slices)",
                f"make model a divisor of {per_slice}, so that data x fsdp is a multiple of "
                f"{num_slices} (the slices go along data, then fsdp)",
            )
        return (data // on_data, fsdp // on_fsdp, model), (on_data, on_fsdp, 1)

    def device_array(self, devices: Sequence[Any]) -> np.ndarray:
        """The ``(data, fsdp, model)`` array of ``devices`` for a multislice job (devices of more
        than one ``slice_index``): each slice's devices form one block, laid out within the slice
        by JAX's topology rule, and the blocks stack along ``data`` then ``fsdp`` in slice order
        (see :meth:`slice_split`). Takes any objects with the attributes JAX's ``mesh_utils``
        reads (``id``, ``platform``, ``device_kind``, ``coords``, ``core_on_chip``,
        ``slice_index``), so it can be checked without a TPU."""
        slices = device_slices(devices)
        within, across = self.slice_split(len(slices), len(slices[0]))
        return mesh_utils.create_hybrid_device_mesh(
            within,
            across,
            [d for group in slices for d in group],
            allow_split_physical_axes=devices[0].device_kind in _SPLIT_PHYSICAL_AXES_KINDS,
        )

    def make(self, devices: Sequence[jax.Device] | None = None) -> Mesh:
        """Build the mesh over ``devices`` (default: every device of every process); over TPU
        slices joined by the data-centre network (multislice), as :meth:`device_array` lays
        them out."""
        devices = list(jax.devices() if devices is None else devices)
        platforms = {getattr(d, "platform", None) for d in devices}
        sizes = self.axis_sizes(len(devices), platforms.pop() if len(platforms) == 1 else None)
        # Auto axes: the compiler propagates shardings through the model from the explicit
        # in/out shardings we give jax.jit. Explicit axes (sharding in types) would make every
        # op's output sharding part of its type and reject ops whose sharding is ambiguous
        # (e.g. contractions over two sharded dimensions, scans over complex pairs), which would
        # force annotations into every layer. Auto keeps the model code mesh-agnostic and is the
        # mode pjit always had; switch to Explicit only with per-layer annotations.
        axis_types = (AxisType.Auto,) * len(MESH_AXES)
        if len(device_slices(devices)) > 1:
            return Mesh(self.device_array(devices), MESH_AXES, axis_types=axis_types)
        try:
            return jax.make_mesh(sizes, MESH_AXES, axis_types=axis_types, devices=devices)
        except NotImplementedError as error:  # mesh_utils found no layout on the TPU's torus
            raise MeshSizeError(
                f"mesh ({self._named()}) does not map onto the {len(devices)} "
                f"{devices[0].device_kind} devices{_physical_layout(devices)}: each axis size "
                "must be a product of whole physical axes",
                "choose other sizes, e.g. move a factor of 2 between two axes",
            ) from error


def _physical_layout(devices: Sequence[Any]) -> str:
    """`` laid out 2 x 2 x 4`` from the devices' ``coords`` (TPU chips), else empty."""
    coords = [getattr(d, "coords", None) for d in devices]
    if not coords or any(c is None for c in coords):
        return ""
    extents = [max(c[i] for c in coords) - min(c[i] for c in coords) + 1 for i in range(3)]
    return " laid out " + " x ".join(map(str, extents))


def device_slices(devices: Sequence[Any]) -> list[list[Any]]:
    """``devices`` grouped by slice (``slice_index`` ascending, given order within a slice): the
    TPU slices of a multislice job. One group when the devices carry no ``slice_index`` (as
    CPU devices) or all share one. A :class:`MeshSizeError` when the slices differ in size."""
    if not all(hasattr(d, "slice_index") for d in devices):
        return [list(devices)]
    groups: dict[int, list[Any]] = {}
    for d in devices:
        groups.setdefault(d.slice_index, []).append(d)
    slices = [groups[k] for k in sorted(groups)]
    sizes = sorted({len(group) for group in slices})
    if len(sizes) > 1:
        counts = ", ".join(f"slice {k}: {len(groups[k])}" for k in sorted(groups))
        raise MeshSizeError(
            f"the devices span {len(slices)} slices of unequal sizes ({counts} devices)",
            "run on slices of one size, or pass devices= from slices of one size",
        )
    return slices


def make_mesh(
    data: int = -1, fsdp: int = 1, model: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A ``("data", "fsdp", "model")`` mesh with Auto axis types; see :class:`MeshConfig`."""
    return MeshConfig(data, fsdp, model).make(devices)


def replicated(mesh: Mesh) -> NamedSharding:
    """The fully replicated sharding on ``mesh`` (scalars, metrics, small state)."""
    return NamedSharding(mesh, PartitionSpec())


# ----------------------------------------------------------------------------------------------
# Logical axes -> mesh axes
# ----------------------------------------------------------------------------------------------


def _mesh_axes_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_mesh_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_AXIS_RULES,
) -> PartitionSpec:
    """The PartitionSpec for an array whose dimensions have logical names ``logical_axes``.

    With ``shape`` and ``mesh``, a dimension whose size is not a multiple of the product of its
    mesh axes' sizes stays replicated (so tiny models run on any mesh). A mesh axis already used
    by an earlier dimension is not used again.
    """
    table: Mapping[str, MeshAxes] = dict(rules)
    if shape is not None and len(shape) != len(logical_axes):
        raise ValueError(
            f"logical axes {tuple(logical_axes)} name {len(logical_axes)} dimensions "
            f"but the array has shape {tuple(shape)}; fix the parameter's axis names (a "
            "layer stack made by nnx.vmap names its new axis with transform_metadata="
            "{nnx.PARTITION_NAME: 'layers'})"
        )
    used: set[str] = set()
    spec: list[MeshAxes] = []
    for dim, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(
                f"logical axis {name!r} has no rule (known: {sorted(table)}); pass rules= "
                f"with a ({name!r}, mesh axes or None) entry added to "
                "hgrn_jax.sharding.LOGICAL_AXIS_RULES or to your own rules"
            )
        axes = tuple(a for a in _mesh_axes_tuple(table[name]) if a not in used)
        if mesh is not None:
            unknown = [a for a in axes if a not in mesh.shape]
            if unknown:
                raise ValueError(
                    f"rule {name!r} -> {unknown} names axes the mesh lacks "
                    f"(mesh axes: {tuple(mesh.axis_names)}); pass rules= mapping the logical "
                    "axes to your mesh's axes to create_sharded / state_shardings "
                    "(hgrn_jax.sharding.LOGICAL_AXIS_RULES is the default, for a data x fsdp x "
                    "model mesh)"
                )
            if shape is not None and shape[dim] % math.prod(mesh.shape[a] for a in axes) != 0:
                axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def _variable_spec(
    variable: nnx.Variable, mesh: Mesh, rules: Sequence[tuple[str, MeshAxes]]
) -> PartitionSpec:
    names = variable.get_metadata().get("out_sharding")
    value = variable.get_value()
    shape = getattr(value, "shape", None)
    if not names or shape is None:
        return PartitionSpec()
    return logical_to_mesh_spec(names, shape, mesh, rules)


def state_shardings(
    abstract_state: Any, mesh: Mesh, rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_AXIS_RULES
) -> Any:
    """NamedShardings for every array leaf of an nnx state (or any pytree of Variables).

    A Variable with logical names (``out_sharding`` metadata) is placed by the rules; that
    includes ``nnx.Optimizer`` moments, which copy their parameter's metadata and so follow its
    sharding. Everything else (BatchNorm statistics, step counters, RNG keys, plain arrays) is
    replicated. The result has the structure of ``abstract_state`` (Variables hold shardings), so
    it can be given to ``jax.jit`` as in/out shardings of that state. Works on concrete or
    abstract (``nnx.eval_shape``) state alike.
    """

    def to_sharding(leaf):
        if isinstance(leaf, nnx.Variable):
            return leaf.replace(NamedSharding(mesh, _variable_spec(leaf, mesh, rules)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(to_sharding, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_with_shardings(state: Any, mesh: Mesh) -> Any:
    """``state`` as ``jax.ShapeDtypeStruct`` leaves carrying their target shardings.

    This is the target to restore an Orbax checkpoint onto ``mesh``
    (``checkpointer.restore(path, abstract_with_shardings(abstract_state, mesh))``).
    """
    shardings = state_shardings(state, mesh)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )


# ----------------------------------------------------------------------------------------------
# Sharded construction and jitted steps
# ----------------------------------------------------------------------------------------------


def init_sharded(
    init: Callable[[], Any],
    mesh: Mesh,
    rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_AXIS_RULES,
) -> tuple[Any, Any]:
    """``(init(), shardings)`` with ``init()``'s pytree created directly in its shards.

    ``jax.eval_shape`` gives the pytree's shapes without allocating, :func:`state_shardings` its
    shardings; one ``jax.jit`` with those ``out_shardings`` then creates the values, so every
    device only ever holds its own shards. ``init`` takes no arguments and must be deterministic,
    since it runs once abstractly and once under jit. Both runs are under ``jax.set_mesh(mesh)``,
    so a mesh the caller has set (``mesh`` or another) changes nothing. ``rules`` maps the
    parameters' logical axis names to ``mesh``'s axes (:data:`LOGICAL_AXIS_RULES`, for a
    ``data x fsdp x model`` mesh, by default; a mesh with other axis names needs its own).
    """
    with jax.set_mesh(mesh):
        shardings = state_shardings(jax.eval_shape(init), mesh, rules)
        return jax.jit(init, out_shardings=shardings)(), shardings


def create_sharded(
    factory: Callable[[], Any],
    mesh: Mesh,
    rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_AXIS_RULES,
) -> Any:
    """Build ``factory()`` (a module, or e.g. a ``(model, optimizer)`` tuple) directly sharded.

    ``factory`` takes no arguments and must be deterministic (create its ``nnx.Rngs`` from a
    fixed seed inside); see :func:`init_sharded`. Works the same inside and outside a
    ``jax.set_mesh`` context, whichever mesh it sets. ``rules``: logical axis name -> mesh
    axes, for a mesh whose axes are not ``data``, ``fsdp``, ``model`` (e.g. ``(("embed",
    None), ("rnn", "tp"), ("mlp", "tp"), ...)`` on a ``("dp", "tp")`` mesh; a name missing
    from the rules is a ValueError listing the known ones).
    """
    # Not nnx.eval_shape: under a set mesh it reads the logical axis names as mesh axes.
    (graphdef, state), _ = init_sharded(lambda: nnx.split(factory()), mesh, rules)
    return nnx.merge(graphdef, state)


def create_sharded_model(factory: Callable[[], nnx.Module], mesh: Mesh) -> nnx.Module:
    """Deprecated alias of :func:`create_sharded`."""
    warnings.warn(
        "sharding.create_sharded_model is deprecated; use sharding.create_sharded",
        HGRNDeprecationWarning,
        stacklevel=2,
    )
    return create_sharded(factory, mesh)


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------


def _batch_axes(mesh: Mesh) -> tuple[str, ...]:
    return _mesh_axes_tuple(dict(LOGICAL_AXIS_RULES)["batch"])


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Shard the leading (batch) dimension of an ``ndim``-D array over ``data`` and ``fsdp``.

    The default ``ndim=1`` spec ``P(("data", "fsdp"))`` also serves as a ``jax.jit`` sharding for
    arrays of any rank (trailing dimensions replicated), e.g. for a whole dict of batch arrays.
    """
    if ndim < 1:
        raise ValueError("a batch array needs a leading batch dimension; got a scalar")
    return NamedSharding(mesh, PartitionSpec(_batch_axes(mesh), *([None] * (ndim - 1))))


def num_batch_shards(mesh: Mesh) -> int:
    """How many ways the batch is split (the product of the ``data`` and ``fsdp`` sizes)."""
    return math.prod(mesh.shape[a] for a in _batch_axes(mesh))


def shard_batch(local_batch: Any, mesh: Mesh) -> Any:
    """Global batch arrays from this process's rows (a pytree of (B_local, ...) arrays).

    Each process passes its own B_local rows, a different slice of the global batch of
    ``B_local * process_count`` rows (on one process: the whole batch). Where a process's rows
    land in the global batch follows the mesh's device order; with :func:`make_mesh` on CPU and
    GPU hosts, process ``p`` holds rows ``[p * B_local, (p + 1) * B_local)``. The global batch
    must be a multiple of :func:`num_batch_shards`.
    """
    shards = num_batch_shards(mesh)
    processes = jax.process_count()
    if shards % processes != 0:
        raise ValueError(
            f"the mesh splits the batch {shards} ways over {processes} processes, so processes "
            "would have to feed identical rows; make data*fsdp a multiple of the process count"
        )

    def to_global(x):
        x = np.asarray(x)
        if x.ndim < 1:
            raise ValueError(
                f"shard_batch needs arrays with a leading batch dimension; got a scalar {x!r}"
            )
        if (x.shape[0] * processes) % shards != 0:
            raise ValueError(
                f"global batch of {x.shape[0] * processes} rows ({x.shape[0]} per process x "
                f"{processes}) does not split over the {shards} data*fsdp shards of the mesh; "
                f"use a global batch size that is a multiple of {shards}"
            )
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

    return jax.tree.map(to_global, local_batch)


# ----------------------------------------------------------------------------------------------
# Multi-host
# ----------------------------------------------------------------------------------------------


def env_whole_number(name: str, minimum: int, env: Mapping[str, str] | None = None) -> int | None:
    """The environment variable ``name`` as a whole number >= ``minimum``, None when unset or
    empty; ValueError naming it otherwise (``JAX_NUM_PROCESSES=two`` was an ``int()``
    traceback, ``HGRN_NUM_CPU_DEVICES=0`` an XLA error about process indices)."""
    text = (os.environ if env is None else env).get(name, "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ValueError(f"{name}={text!r} must be a whole number >= {minimum} (or unset)")
    return value


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
    env: Mapping[str, str] | None = None,
    heartbeat_timeout_s: int | None = None,
    shutdown_timeout_s: int | None = None,
) -> bool:
    """Call ``jax.distributed.initialize`` when this run is multi-process; True if it is.

    Multi-process when any of: explicit arguments; the environment variables
    ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``; ``auto=True`` or
    ``HGRN_DISTRIBUTED=1``, which call ``initialize()`` with no arguments so JAX detects the
    cluster itself (TPU pods, SLURM, Open MPI). Must run before anything touches a device.
    Calling it again after a successful initialisation is a no-op.

    Failure detection: the coordination service declares a process dead when it has sent no
    heartbeat for ``heartbeat_timeout_s`` (``HGRN_HEARTBEAT_TIMEOUT_S``; JAX's default, 100 s,
    when unset) and then stops every other process with an error naming it;
    ``shutdown_timeout_s`` (``HGRN_SHUTDOWN_TIMEOUT_S``; default 300 s) bounds how long an exiting
    process waits for the others at the shutdown barrier.
    """
    env = os.environ if env is None else env
    if jax.distributed.is_initialized():
        return True
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None:
        num_processes = env_whole_number("JAX_NUM_PROCESSES", 1, env)
    if process_id is None:
        process_id = env_whole_number("JAX_PROCESS_ID", 0, env)
    auto = auto or env.get("HGRN_DISTRIBUTED", "").lower() in ("1", "true", "yes", "auto")
    if coordinator_address is None and num_processes is None and process_id is None and not auto:
        return False
    if num_processes == 1:
        return False
    timeouts = {}
    heartbeat = heartbeat_timeout_s or env_whole_number("HGRN_HEARTBEAT_TIMEOUT_S", 0, env)
    if heartbeat:
        timeouts["heartbeat_timeout_seconds"] = heartbeat
    shutdown = shutdown_timeout_s or env_whole_number("HGRN_SHUTDOWN_TIMEOUT_S", 0, env)
    if shutdown:
        timeouts["shutdown_timeout_seconds"] = shutdown
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        **timeouts,
    )
    return True
