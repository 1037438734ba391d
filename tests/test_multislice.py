"""Multislice meshes on mock TPU devices (no TPU here): slices go along ``data`` then ``fsdp``,
never ``model``; misfits get one-line errors; single-slice and CPU meshes are as before."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import AxisType

from hgrn_jax import sharding as sh


@dataclasses.dataclass(frozen=True)
class FakeTpu:
    """The attributes of a TPU device that ``jax.experimental.mesh_utils`` reads."""

    id: int
    slice_index: int
    process_index: int
    coords: tuple[int, int, int]
    core_on_chip: int = 0
    platform: str = "tpu"
    device_kind: str = "TPU v4"


def fake_slices(
    num_slices: int, shape: tuple[int, int, int], kind: str = "TPU v4", per_host: int = 4
) -> list[FakeTpu]:
    """``num_slices`` slices of ``prod(shape)`` chips each, chips at coordinates (x, y, z) of a
    ``shape`` cuboid (x fastest, as jax.devices() lists them), ``per_host`` chips per process;
    ids and processes numbered across slices, coordinates repeating in each slice."""
    per_slice = int(np.prod(shape))
    chips = [(x, y, z) for z in range(shape[2]) for y in range(shape[1]) for x in range(shape[0])]
    return [
        FakeTpu(
            id=s * per_slice + i,
            slice_index=s,
            process_index=(s * per_slice + i) // per_host,
            coords=coords,
            device_kind=kind,
        )
        for s in range(num_slices)
        for i, coords in enumerate(chips)
    ]


def ids(devices: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda d: d.id)(devices)


# (slices, chips per slice as a cuboid, TPU kind, mesh (data, fsdp, model), slices along
# (data, fsdp)).
CASES = [
    (2, (2, 2, 1), "TPU v4", (-1, 1, 1), (2, 1)),
    (2, (2, 2, 1), "TPU v4", (2, 1, 4), (2, 1)),
    (2, (2, 2, 1), "TPU v4", (2, 2, 2), (2, 1)),
    (2, (2, 2, 1), "TPU v4", (1, -1, 4), (1, 2)),
    (4, (2, 2, 2), "TPU v4", (-1, 1, 8), (4, 1)),
    (4, (2, 2, 2), "TPU v4", (2, 4, 4), (2, 2)),
    (4, (2, 4, 1), "TPU v5 lite", (-1, 2, 2), (4, 1)),
    (4, (2, 4, 1), "TPU v5 lite", (2, -1, 1), (2, 2)),
    (3, (2, 2, 1), "TPU v4", (2, -1, 1), (1, 3)),
    (4, (2, 4, 1), "TPU v5 lite", (1, 8, 4), (1, 4)),
]


@pytest.mark.parametrize(("num_slices", "shape", "kind", "mesh", "across"), CASES)
def test_slices_go_along_data_then_fsdp_and_model_stays_inside_a_slice(
    num_slices, shape, kind, mesh, across
):
    devices = fake_slices(num_slices, shape, kind)
    config = sh.MeshConfig(*mesh)
    sizes = config.axis_sizes(len(devices))
    per_slice = len(devices) // num_slices
    array = config.device_array(devices)
    assert array.shape == sizes
    assert sorted(ids(array).ravel()) == list(range(len(devices)))

    within = tuple(s // a for s, a in zip(sizes, (*across, 1)))
    assert config.slice_split(num_slices, per_slice) == (within, (*across, 1))
    slice_of = np.vectorize(lambda d: d.slice_index)(array)
    for i, j, k in itertools.product(*map(range, sizes)):
        # Slices stack along data (outer) then fsdp, in slice order; model never changes slice.
        expected = (i // within[0]) * across[1] + j // within[1]
        assert slice_of[i, j, k] == expected, (i, j, k)
    for s in range(num_slices):
        a, b = divmod(s, across[1])
        block = array[a * within[0] : (a + 1) * within[0], b * within[1] : (b + 1) * within[1]]
        # Inside a slice, the layout a single-slice run of that size gets from jax.make_mesh.
        alone = jax.make_mesh(within, sh.MESH_AXES, devices=devices[s * per_slice :][:per_slice])
        np.testing.assert_array_equal(ids(block), ids(alone.devices))


def test_two_slices_of_four_v4_chips_in_order():
    """The data axis runs through slice 0's ring of chips, then slice 1's."""
    devices = fake_slices(2, (2, 2, 1))
    mesh = sh.make_mesh(data=-1, devices=devices)
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "model": 1}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert ids(mesh.devices).ravel().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    mesh = sh.make_mesh(data=2, fsdp=1, model=4, devices=devices)
    assert ids(mesh.devices)[:, 0].tolist() == [[0, 2, 1, 3], [4, 6, 5, 7]]


def test_misfits_name_the_axes_slices_and_fix():
    with pytest.raises(sh.MeshSizeError) as error:
        sh.make_mesh(data=1, fsdp=1, model=8, devices=fake_slices(2, (2, 2, 1)))
    assert str(error.value) == (
        "mesh (data=1, fsdp=1, model=8) on 2 slices of 4 devices: model=8 does not fit inside "
        "one slice (tensor parallelism must not cross slices; data x fsdp = 1 x 1 is not a "
        "multiple of 2 slices); make model a divisor of 4, so that data x fsdp is a multiple "
        "of 2 (the slices go along data, then fsdp)"
    )
    with pytest.raises(ValueError, match=r"data=1, fsdp=2, model=16\) on 4 slices of 8 .* 1 x 2"):
        sh.make_mesh(data=1, fsdp=2, model=16, devices=fake_slices(4, (2, 2, 2)))
    with pytest.raises(ValueError, match=r"model=-1\) on 4 slices of 8 devices: model=16 "):
        sh.make_mesh(data=2, fsdp=1, model=-1, devices=fake_slices(4, (2, 2, 2)))
    uneven = fake_slices(1, (2, 2, 1)) + [
        dataclasses.replace(d, id=d.id + 4, slice_index=1) for d in fake_slices(1, (2, 2, 2))
    ]
    with pytest.raises(ValueError, match=r"2 slices of unequal sizes \(slice 0: 4, slice 1: 8 "):
        sh.make_mesh(data=-1, devices=uneven)
    with pytest.raises(ValueError, match="needs 16 devices but this run has 8") as error:
        sh.make_mesh(data=2, fsdp=2, model=4, devices=fake_slices(2, (2, 2, 1)))
    assert "XLA_FLAGS" not in str(error.value)  # TPUs: no CPU flag to simulate more


def test_a_mesh_one_slice_s_torus_cannot_hold_is_a_one_line_error():
    """On a v4-32 (16 chips, 2 x 2 x 4) JAX's layout search finds no place for data=2, fsdp=2,
    model=4 and raised NotImplementedError, which the runner does not take for a user error
    (a traceback from jax/_src/mesh_utils.py)."""
    devices = fake_slices(1, (2, 2, 4))
    with pytest.raises(sh.MeshSizeError) as error:
        sh.make_mesh(data=2, fsdp=2, model=4, devices=devices)
    assert str(error.value) == (
        "mesh (data=2, fsdp=2, model=4) does not map onto the 16 TPU v4 devices laid out "
        "2 x 2 x 4: each axis size must be a product of whole physical axes; choose other "
        "sizes, e.g. move a factor of 2 between two axes"
    )
    assert dict(sh.make_mesh(data=4, fsdp=1, model=4, devices=devices).shape)["model"] == 4


def test_runner_check_names_config_keys_for_slices():
    from hgrn_jax.training.config_checks import check_mesh_and_batches

    config = ml_collections.ConfigDict({"mesh": {"data": -1, "fsdp": 1, "model": 8}})
    with pytest.raises(ValueError) as error:
        check_mesh_and_batches(config, num_devices=8, num_processes=2, num_slices=2)
    message = str(error.value)
    assert message.startswith("config.mesh (data=-1, fsdp=1, model=8) on 2 slices of 4 devices")
    assert "set --config.mesh.model to a divisor of 4" in message and "\n" not in message
    config.mesh.model = 4
    assert check_mesh_and_batches(config, num_devices=8, num_processes=2, num_slices=2) == (2, 1, 4)
    config.mesh.model = 8
    # One slice (this machine's 8 CPU devices): model=8 fits.
    assert check_mesh_and_batches(config, num_devices=8, num_processes=1) == (1, 1, 8)


@pytest.mark.parametrize("sizes", [(8, 1, 1), (2, 2, 2), (1, 4, 2), (4, 1, 2), (1, 1, 8)])
def test_one_slice_and_cpu_meshes_are_unchanged(sizes):
    """No slice_index (CPU) or a single slice: jax.make_mesh's mesh, device for device."""
    assert sh.device_slices(jax.devices()) == [jax.devices()]
    mesh = sh.make_mesh(*sizes)
    assert ids(mesh.devices).ravel().tolist() == list(range(8))  # as before multislice support
    before = jax.make_mesh(sizes, sh.MESH_AXES, devices=jax.devices())
    np.testing.assert_array_equal(mesh.devices, before.devices)
    one_slice = fake_slices(1, (2, 2, 2))
    mesh = sh.make_mesh(*sizes, devices=one_slice)
    before = jax.make_mesh(sizes, sh.MESH_AXES, devices=one_slice)
    np.testing.assert_array_equal(ids(mesh.devices), ids(before.devices))
