"""How checkpoints write replicated arrays (hgrn_jax.training.checkpoint.REPLICA_PARALLEL_MIN_BYTES):
small ones from one replica, without compiling slicing programs; large ones split across replicas.
Either way the checkpoint restores to the saved values, bit for bit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hgrn_jax.training.checkpoint import REPLICA_PARALLEL_MIN_BYTES, Checkpoints


def test_replicated_arrays_are_sliced_across_replicas_only_when_large(tmp_path, monkeypatch):
    slices: list[tuple] = []
    slice_in_dim = jax.lax.slice_in_dim

    def counting_slice(operand, *args, **kwargs):
        slices.append(operand.shape)
        return slice_in_dim(operand, *args, **kwargs)

    monkeypatch.setattr(jax.lax, "slice_in_dim", counting_slice)
    mesh = jax.make_mesh((8,), ("data",))
    replicated = NamedSharding(mesh, P())
    # Each of the 8 replicas would write 1/8: the large array's slices reach the threshold.
    large_size = 8 * REPLICA_PARALLEL_MIN_BYTES // 4
    tree = {
        "small": jax.device_put(jnp.arange(24 * 40, dtype=jnp.float32).reshape(24, 40), replicated),
        "large": jax.device_put(jnp.arange(large_size, dtype=jnp.float32), replicated),
        "sharded": jax.device_put(jnp.ones((16, 3), jnp.int32), NamedSharding(mesh, P("data"))),
    }
    checkpoints = Checkpoints(tmp_path / "checkpoints", async_save=False)
    checkpoints.save(1, tree, {"step": 1})
    # This process holds all 8 replicas of the large array: one slice each; none of the others.
    assert slices == [(large_size,)] * 8, slices

    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
    )
    restored, meta = checkpoints.restore(1, target)
    checkpoints.close()
    assert meta == {"step": 1}
    for key, array in tree.items():
        np.testing.assert_array_equal(np.asarray(restored[key]), np.asarray(array), err_msg=key)
        assert restored[key].sharding == array.sharding, key


def test_type_handlers_follow_orbax_defaults_except_the_replica_parallel_threshold():
    """The registry our checkpoints save with is Orbax's default one, jax.Array's handler set up
    as Orbax sets up its own but for the replica-parallel threshold: a new default type, or a
    default Orbax sets differently in a later release, shows here."""
    import orbax.checkpoint as ocp

    from hgrn_jax.training.checkpoint import _type_handlers

    ours = _type_handlers()
    for kind in ocp.type_handlers.supported_types():
        theirs = ocp.type_handlers.get_type_handler(kind)
        assert type(ours.get(kind)) is type(theirs), kind
    # Copies: vars() is the handlers' own __dict__, and Orbax's is global.
    default = dict(vars(ocp.type_handlers.get_type_handler(jax.Array)))
    array = dict(vars(ours.get(jax.Array)))
    assert array.pop("_min_slice_bytes_for_replica_parallel") == REPLICA_PARALLEL_MIN_BYTES
    assert default.pop("_min_slice_bytes_for_replica_parallel") is None
    assert array.keys() == default.keys()
    for name, value in default.items():
        # State, not settings: the metadata store, and the extra metadata Orbax's global
        # handler caches from earlier saves in this process (e.g. random keys' impl per path;
        # another test's saves filled it when xdist ran that test's file first here).
        if name in ("_array_metadata_store", "_ext_metadata"):
            assert type(array[name]) is type(value)
        elif name not in ("_dispatcher", "_callback"):
            assert array[name] == value, name


def test_a_numbered_folder_that_is_no_checkpoint_stops_the_run_untouched(tmp_path):
    """Orbax takes every numbered folder in checkpoints/ for a step, and its keep policy deleted
    a user's checkpoints/1/notes.txt (with the folder) at the run's next save. A numbered folder
    holding anything a checkpoint does not is refused, naming it; one left partly deleted by a
    kill (some items gone, or none) or with a checksum file cut short is still taken."""
    import pytest

    from hgrn_jax.training.checkpoint import CheckpointError

    directory = tmp_path / "checkpoints"
    Checkpoints(directory, async_save=False).save(4, {"w": jnp.ones(3)}, {"step": 4})
    (directory / "1").mkdir()  # emptied by a deletion the kill cut short
    (directory / "2" / "state").mkdir(parents=True)
    (directory / "2" / "integrity.json.tmp").write_text("{")
    Checkpoints(directory)
    (directory / "3").mkdir()
    (directory / "3" / "notes.txt").write_text("mine")
    (directory / "3" / "model.pt").write_text("weights")
    with pytest.raises(
        CheckpointError,
        match=rf"^{directory / '3'} holds model\.pt, notes\.txt, which no checkpoint of a run "
        rf"writes.*nothing was changed\. Move that folder out of {directory} and run again$",
    ):
        Checkpoints(directory)
    assert (directory / "3" / "notes.txt").read_text() == "mine"
