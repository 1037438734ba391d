"""Sharding over the 8 simulated devices: the same training step on a 2x2x2 mesh as on one
device, rules applied, checkpoints restored across meshes, and the mesh/batch helpers' errors."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from sharded_step import sharded_train_step

from hgrn_jax import sharding as sh
from hgrn_jax.nn import HGRNLM, ClassifierConfig, HGRNClassifier, LMConfig, MixerConfig

MESHES = {"8x1x1": (8, 1, 1), "2x2x2": (2, 2, 2), "1x1x1": (1, 1, 1)}
# The meshes a training step runs on, compared with each other: the one-device step and the
# 2x2x2 mesh, which splits the batch over data and fsdp (as 8x1x1 splits it over data: the same
# batch sharding, the same cross-device reductions of gradients and BatchNorm statistics) and
# also splits the parameters over fsdp and model. 8x1x1 is a restore target of the checkpoint.
STEP_MESHES = ("2x2x2", "1x1x1")

# Every sharded dimension is even, so each rule really splits it on the (2, 2, 2) mesh.
LM_CONFIG = LMConfig(vocab_size=32, features=8, num_layers=2, glu_expand=2)
CLASSIFIER_CONFIG = ClassifierConfig(
    num_classes=3,
    features=8,
    num_layers=1,
    glu_expand=2,
    encoder="embed",
    vocab_size=16,
    norm="batch",
)
BATCH, LENGTH = 8, 6


def mesh_of(name: str) -> jax.sharding.Mesh:
    data, fsdp, model = MESHES[name]
    return sh.make_mesh(data, fsdp, model, devices=jax.devices()[: data * fsdp * model])


def adamw() -> optax.GradientTransformation:
    """AdamW whose first step is lr * g / (|g| + eps). Biases just before a BatchNorm have a
    gradient that is zero up to float32 noise (~1e-8 to 2e-8, the norm removes any constant
    shift); with the default eps = 1e-8 Adam would turn that noise into +-lr steps that differ
    between meshes. eps = 1e-2 keeps those steps below 1e-7 / 5 (eps = 1e-3 gave 1.5e-7 once),
    while the real gradients (mostly 1e-3 to 1e-1 here) still take steps of a good fraction
    of lr."""
    return optax.adamw(1e-2, eps=1e-2, weight_decay=0.1)


def lm_and_optimizer() -> tuple[HGRNLM, nnx.Optimizer]:
    model = HGRNLM(LM_CONFIG, rngs=nnx.Rngs(0))
    return model, nnx.Optimizer(model, adamw(), wrt=nnx.Param)


def lm_batch() -> dict[str, np.ndarray]:
    ids = np.random.default_rng(0).integers(0, LM_CONFIG.vocab_size, (BATCH, LENGTH + 1))
    return {"inputs": ids[:, :-1].astype(np.int32), "targets": ids[:, 1:].astype(np.int32)}


def lm_loss(model: HGRNLM, batch: dict[str, jax.Array]) -> jax.Array:
    logits = model(batch["inputs"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()


def classifier_and_optimizer() -> tuple[HGRNClassifier, nnx.Optimizer]:
    model = HGRNClassifier(CLASSIFIER_CONFIG, rngs=nnx.Rngs(1))
    return model, nnx.Optimizer(model, adamw(), wrt=nnx.Param)


def classifier_batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    lengths = rng.integers(2, LENGTH + 1, BATCH)  # padded on the right
    return {
        "inputs": rng.integers(0, CLASSIFIER_CONFIG.vocab_size, (BATCH, LENGTH)).astype(np.int32),
        "mask": (np.arange(LENGTH)[None, :] < lengths[:, None]).astype(np.int32),
        "labels": rng.integers(0, CLASSIFIER_CONFIG.num_classes, BATCH).astype(np.int32),
    }


def classifier_loss(model: HGRNClassifier, batch: dict[str, jax.Array]) -> jax.Array:
    logits = model(batch["inputs"], mask=batch["mask"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()


def as_numpy(state) -> dict[str, np.ndarray]:
    """Leaves keyed by their path (typed PRNG keys as their raw key data)."""
    leaves = jax.tree_util.tree_leaves_with_path(state)
    out = {}
    for path, leaf in leaves:
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out[jax.tree_util.keystr(path)] = np.asarray(jax.device_get(leaf))
    return out


def assert_same_step(results: dict[str, tuple[float, dict]]) -> None:
    """Losses and every state leaf agree across meshes within 1e-5 relative.

    Meshes only change the order of float32 reductions (rounding ~1e-7 relative), and the first
    AdamW step is insensitive to it (see :func:`adamw`).
    """
    (ref_name, (ref_loss, ref_state)), *others = results.items()
    for name, (loss, state) in others:
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=f"{name} vs {ref_name}")
        assert state.keys() == ref_state.keys()
        for key, ref in ref_state.items():
            np.testing.assert_allclose(
                state[key], ref, rtol=1e-5, atol=1e-7, err_msg=f"{key}: {name} vs {ref_name}"
            )


@pytest.fixture(scope="module")
def lm_steps() -> dict[str, tuple[nnx.GraphDef, nnx.State, jax.Array]]:
    batch = lm_batch()
    return {
        name: sharded_train_step(lm_and_optimizer, lm_loss, batch, mesh_of(name))
        for name in STEP_MESHES
    }


@pytest.mark.slow  # end-to-end / multi-process / shared multi-mesh fixture: over 20 s
def test_lm_step_on_a_2x2x2_mesh_is_the_one_device_step(lm_steps):
    results = {name: (float(loss), as_numpy(state)) for name, (_, state, loss) in lm_steps.items()}
    assert_same_step(results)
    # The step did move the parameters (so the comparison above is not vacuous).
    initial = as_numpy(nnx.state(lm_and_optimizer()))
    key = "[0]['blocks'][0]['mlp']['up_proj']['kernel'].value"
    assert key in initial
    assert np.abs(results["2x2x2"][1][key] - initial[key]).max() > 1e-3


@pytest.mark.slow  # end-to-end / multi-process / shared multi-mesh fixture: over 20 s
def test_lm_parameters_are_sharded_by_the_rules(lm_steps):
    _, state, _ = lm_steps["2x2x2"]
    model_state, optimizer_state = state[0], state[1]
    block = model_state["blocks"][0]
    expected = {
        "embedding": (model_state["embed"]["embedding"], P("model", "fsdp")),  # (vocab, embed)
        "input_proj": (block["mixer"]["input_proj"]["kernel"], P("fsdp", "model")),  # embed, rnn
        "out_proj": (block["mixer"]["out_proj"]["kernel"], P("model", "fsdp")),  # rnn, embed
        "theta": (block["mixer"]["theta"], P("model")),
        "gate_proj": (block["mlp"]["gate_proj"]["kernel"], P("fsdp", "model")),  # embed, mlp
        "down_proj bias": (block["mlp"]["down_proj"]["bias"], P("fsdp")),
        "norm scale": (block["norm1"]["scale"], P("fsdp")),
        "lower bounds": (model_state["lower_bounds"]["param"], P(None, "model")),  # layers, rnn
        "adam mu": (
            optimizer_state["opt_state"][0]["mu"]["blocks"][0]["mlp"]["gate_proj"]["kernel"],
            P("fsdp", "model"),
        ),
        "adam nu": (
            optimizer_state["opt_state"][0]["nu"]["embed"]["embedding"],
            P("model", "fsdp"),
        ),
        "adam count": (optimizer_state["opt_state"][0]["count"], P()),
        "step": (optimizer_state["step"], P()),
    }
    for name, (variable, spec) in expected.items():
        array = variable.get_value()
        assert array.sharding.spec == spec, name
        if spec != P():
            shard = array.addressable_shards[0].data.shape
            assert np.prod(shard) < np.prod(array.shape), f"{name} is not actually split"


HGRN2_MIXERS = {
    "official": MixerConfig(kind="hgrn2", expand_ratio=2),
    "fla": MixerConfig(kind="hgrn2", layout="fla", expand_ratio=2, use_bias=False),
}


@pytest.mark.slow  # two compiled optimizer steps per layout
@pytest.mark.parametrize("layout", list(HGRN2_MIXERS))
def test_hgrn2_lm_step_on_a_2x2x2_mesh_is_the_one_device_step(layout):
    """An HGRN2 LM (one block, 4 heads of width 2) split over data, fsdp and model takes the
    one-device step (tolerances as for HGRU's LM, :func:`assert_same_step`), with its
    projections split over ``model`` by the rules: the head axis is cut across devices, and the
    recurrence's per-head state must not mix them. (One block: the heads are split within each
    block alike; the two-block HGRU LM covers the stack.)"""
    config = dataclasses.replace(LM_CONFIG, num_layers=1, mixer=HGRN2_MIXERS[layout])

    def factory():
        model = HGRNLM(config, rngs=nnx.Rngs(0))
        return model, nnx.Optimizer(model, adamw(), wrt=nnx.Param)

    batch = lm_batch()
    steps = {
        name: sharded_train_step(factory, lm_loss, batch, mesh_of(name))
        for name in ("1x1x1", "2x2x2")
    }
    results = {name: (float(loss), as_numpy(state)) for name, (_, state, loss) in steps.items()}
    assert_same_step(results)
    mixer = steps["2x2x2"][1][0]["blocks"][0]["mixer"]
    projection = mixer["in_proj" if layout == "official" else "q_proj"]["kernel"].get_value()
    assert projection.sharding.spec == P("fsdp", "model")
    assert np.prod(projection.addressable_shards[0].data.shape) < np.prod(projection.shape)
    initial = as_numpy(nnx.state(factory()))
    moved = [
        k
        for k in initial
        if "mixer" in k and np.abs(results["1x1x1"][1][k] - initial[k]).max() > 1e-3
    ]
    assert moved, "the step did not move the mixer's parameters"


@pytest.fixture(scope="module")
def classifier_steps() -> dict[str, tuple[nnx.GraphDef, nnx.State, jax.Array]]:
    batch = classifier_batch()
    return {
        name: sharded_train_step(classifier_and_optimizer, classifier_loss, batch, mesh_of(name))
        for name in STEP_MESHES
    }


@pytest.mark.slow  # end-to-end / multi-process / shared multi-mesh fixture: over 20 s
def test_batchnorm_classifier_step_on_a_2x2x2_mesh_is_the_one_device_step(classifier_steps):
    results = {
        name: (float(loss), as_numpy(state)) for name, (_, state, loss) in classifier_steps.items()
    }
    assert_same_step(results)
    # BatchNorm's running statistics were updated from the global batch, identically everywhere.
    initial = as_numpy(nnx.state(classifier_and_optimizer()))
    key = "[0]['blocks'][0]['norm1']['mean'].value"
    assert key in initial
    assert np.abs(results["2x2x2"][1][key] - initial[key]).max() > 1e-3


@pytest.mark.slow  # end-to-end / multi-process / shared multi-mesh fixture: over 20 s
def test_classifier_state_is_sharded_by_the_rules(classifier_steps):
    _, state, _ = classifier_steps["2x2x2"]
    block = state[0]["blocks"][0]
    expected = {
        "bn scale": (block["norm1"]["scale"], P("fsdp")),
        "bn running mean": (block["norm1"]["mean"], P()),
        "bn running var": (block["norm2"]["var"], P()),
        "theta_reverse": (block["mixer"]["theta_reverse"], P("model")),
        "glu up": (block["mlp"]["up_proj"]["kernel"], P("fsdp", "model")),
        "head": (state[0]["head"]["kernel"], P("fsdp", None)),  # (embed, classes): 3 classes
        "encoder": (state[0]["encoder"]["embedding"], P("model", "fsdp")),
    }
    for name, (variable, spec) in expected.items():
        assert variable.get_value().sharding.spec == spec, name


@pytest.mark.slow  # end-to-end / multi-process / shared multi-mesh fixture: over 20 s
def test_checkpoint_from_2x2x2_restores_onto_other_meshes(lm_steps, classifier_steps, tmp_path):
    # Whole states: parameters, AdamW moments and counters, BatchNorm statistics, RNG keys.
    saved = {"lm": lm_steps["2x2x2"][1], "classifier": classifier_steps["2x2x2"][1]}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", saved)
    checkpointer.wait_until_finished()
    expected = as_numpy(saved)
    for name in ("8x1x1", "1x1x1"):
        mesh = mesh_of(name)
        restored = checkpointer.restore(tmp_path / "ckpt", sh.abstract_with_shardings(saved, mesh))
        got = as_numpy(restored)
        assert got.keys() == expected.keys()
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{key} on {name}")
        for leaf, target in zip(
            jax.tree.leaves(restored), jax.tree.leaves(sh.state_shardings(saved, mesh))
        ):
            assert leaf.sharding == target
        model, _ = nnx.merge(lm_steps["2x2x2"][0], restored["lm"])
        assert model.embed.embedding.get_value().sharding.mesh.devices.size == mesh.devices.size


# ---------------------------------------------------------------------------------------------
# Rules, meshes and batches
# ---------------------------------------------------------------------------------------------


def test_rules_fall_back_to_replicated_when_a_size_does_not_divide():
    mesh = sh.make_mesh(2, 2, 2)
    assert sh.logical_to_mesh_spec(("embed", "mlp"), (8, 16), mesh) == P("fsdp", "model")
    assert sh.logical_to_mesh_spec(("embed", "mlp"), (7, 16), mesh) == P(None, "model")
    assert sh.logical_to_mesh_spec(("batch", "length", "embed"), (6, 3, 8), mesh) == P(
        None, None, "fsdp"
    )  # 6 rows do not split 4 ways
    assert sh.logical_to_mesh_spec(("batch", None), (8, 3), mesh) == P(("data", "fsdp"), None)
    assert sh.logical_to_mesh_spec(("layers", "classes"), (2, 2), mesh) == P(None, None)
    with pytest.raises(ValueError, match=r"'heads' has no rule .*pass rules= with a \('heads', "):
        sh.logical_to_mesh_spec(("heads",), (4,), mesh)
    with pytest.raises(ValueError, match="name 2 dimensions but the array has shape"):
        sh.logical_to_mesh_spec(("embed", "mlp"), (8,), mesh)
    users = jax.make_mesh((4, 2), ("batch", "tensor"))  # a user's own axis names
    with pytest.raises(
        ValueError,
        match=r"rule 'embed' -> \['fsdp'\] names axes the mesh lacks \(mesh axes: \('batch', "
        r"'tensor'\)\); pass rules= mapping the logical axes to your mesh's axes",
    ):
        sh.logical_to_mesh_spec(("embed",), (8,), users)
    mine = [(name, "tensor" if axes == "model" else None) for name, axes in sh.LOGICAL_AXIS_RULES]
    assert sh.logical_to_mesh_spec(("embed", "mlp"), (8, 16), users, mine) == P(None, "tensor")


def test_create_sharded_takes_the_rules_of_a_mesh_with_other_axis_names():
    from hgrn_jax.nn import HGRU

    users = jax.make_mesh((4, 2), ("dp", "tp"))
    factory = lambda: HGRU(8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"names axes the mesh lacks .*pass rules= .*create_shard"):
        sh.create_sharded(factory, users)
    mine = [(name, "tp" if axes == "model" else None) for name, axes in sh.LOGICAL_AXIS_RULES]
    layer = sh.create_sharded(factory, users, rules=mine)
    assert layer.input_proj.kernel[...].sharding.spec == P(None, "tp")  # ("embed", "rnn")
    assert layer.theta[...].sharding.spec == P("tp")
    np.testing.assert_array_equal(layer.input_proj.kernel[...], factory().input_proj.kernel[...])


def test_make_mesh_resolves_the_rest_and_explains_bad_sizes():
    mesh = sh.make_mesh(data=-1, fsdp=2, model=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "model": 2}
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3
    assert sh.MeshConfig(fsdp=-1, data=1).axis_sizes(8) == (1, 8, 1)
    with pytest.raises(ValueError, match="product divides 8"):
        sh.make_mesh(data=3)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        sh.make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="set one axis to -1") as error:
        sh.make_mesh(data=2, fsdp=2, model=1)
    assert "XLA_FLAGS" not in str(error.value)  # enough devices: simulating more is no fix
    with pytest.raises(sh.MeshSizeError) as error:  # too few CPU devices: the flag that adds some
        sh.make_mesh(data=2, fsdp=2, model=4)
    assert str(error.value) == (
        "mesh (data=2, fsdp=2, model=4) needs 16 devices but this run has 8 devices; choose axis "
        "sizes whose product divides 8; on a CPU, XLA_FLAGS="
        "--xla_force_host_platform_device_count=16 (set before JAX starts) simulates 16 devices"
    )


def test_shard_batch_splits_rows_over_data_and_fsdp():
    mesh = sh.make_mesh(2, 2, 2)
    batch = {"x": np.arange(8 * 3, dtype=np.float32).reshape(8, 3), "y": np.arange(8)}
    out = sh.shard_batch(batch, mesh)
    assert out["x"].sharding.spec == P(("data", "fsdp"), None)
    assert {s.data.shape for s in out["x"].addressable_shards} == {(2, 3)}
    np.testing.assert_array_equal(np.asarray(out["x"]), batch["x"])
    np.testing.assert_array_equal(np.asarray(out["y"]), batch["y"])
    with pytest.raises(ValueError, match="multiple of 4"):
        sh.shard_batch({"x": np.zeros((6, 3))}, mesh)


def test_raw_optax_moments_follow_their_parameters():
    """The runner's pattern: optax state of an ``nnx.State`` of params keeps their axis names."""
    mesh = sh.make_mesh(2, 2, 2)
    params = nnx.state(nnx.eval_shape(lambda: HGRNLM(LM_CONFIG, rngs=nnx.Rngs(0))), nnx.Param)
    opt_state = jax.eval_shape(optax.adamw(1e-3).init, params)
    shardings = sh.state_shardings({"params": params, "opt": opt_state}, mesh)
    kernel = shardings["params"]["blocks"][1]["mixer"]["out_proj"]["kernel"].get_value()
    assert kernel.spec == P("model", "fsdp")
    for moment in (shardings["opt"][0].mu, shardings["opt"][0].nu):
        assert moment["blocks"][1]["mixer"]["out_proj"]["kernel"].get_value() == kernel
    assert shardings["opt"][0].count.spec == P()


@pytest.mark.parametrize("active", ["same mesh", "other mesh"])
def test_create_sharded_inside_a_set_mesh_is_create_sharded_outside(active):
    """Under ``jax.set_mesh`` (the target mesh, or one with other axis names) the model and its
    optimizer come out with the same shardings and the same values as with no mesh set: the
    same initialisation, so equal exactly."""
    mesh = mesh_of("2x2x2")
    active_mesh = {
        "same mesh": mesh,
        "other mesh": jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,)),
    }[active]
    outside = nnx.state(sh.create_sharded(lm_and_optimizer, mesh))
    with jax.set_mesh(active_mesh):
        inside = nnx.state(sh.create_sharded(lm_and_optimizer, mesh))
    outside_leaves = jax.tree_util.tree_leaves_with_path(outside)
    inside_leaves = jax.tree_util.tree_leaves_with_path(inside)
    assert [p for p, _ in inside_leaves] == [p for p, _ in outside_leaves]
    assert any(x.sharding.spec != P() for _, x in outside_leaves)  # the rules really shard
    for (path, x), (_, y) in zip(inside_leaves, outside_leaves, strict=True):
        assert x.sharding == y.sharding, jax.tree_util.keystr(path)
    np.testing.assert_equal(as_numpy(inside), as_numpy(outside))


def test_maybe_initialize_distributed_is_a_no_op_without_a_request():
    assert sh.maybe_initialize_distributed(env={}) is False
    assert sh.maybe_initialize_distributed(env={"JAX_NUM_PROCESSES": "1"}) is False


def _collectives(compiled) -> dict[str, int]:
    """How many of each cross-device operation a compiled executable runs (async starts
    counted once)."""
    names = re.findall(
        r"\b(all-gather|all-reduce|collective-permute|all-to-all|reduce-scatter)(?:-start)?\(",
        compiled.as_text(),
    )
    return {name: names.count(name) for name in sorted(set(names))}


@pytest.mark.slow  # two sharded compilations: about 9 s
def test_merged_directions_move_no_channels_between_devices(monkeypatch):
    """On a mesh whose model axis shards the HGRU's channels, a bidirectional layer with its two
    directions in one scan compiles to the same cross-device operations as with two scans, and
    computes the same (concatenating the directions on the channel axis instead moved channels
    between devices: 14 -> 32 collective permutes here)."""
    from hgrn_jax.nn import hgru

    mesh = sh.make_mesh(2, 1, 4, devices=jax.devices()[:8])
    x = jax.device_put(
        jnp.asarray(np.random.default_rng(0).normal(size=(4, 12, 16)), jnp.float32),
        sh.batch_sharding(mesh, 3),
    )
    results = {}
    for merged in (False, True):
        monkeypatch.setattr(hgru, "MERGE_DIRECTIONS", merged)
        layer = sh.create_sharded(
            lambda: hgru.HGRU(16, bidirectional=True, method="associative", rngs=nnx.Rngs(0)),
            mesh,
        )
        graphdef, state = nnx.split(layer)

        def loss(state, x, graphdef=graphdef):
            return jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x, 0.3)) * x)

        with jax.set_mesh(mesh):
            compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(state, x).compile()
            results[merged] = (_collectives(compiled), compiled(state, x))
    (two_ops, (two_loss, two_grads)), (one_ops, (one_loss, one_grads)) = results.values()
    assert two_ops.get("collective-permute", 0) > 0  # the channels really are split
    assert one_ops == two_ops
    np.testing.assert_allclose(one_loss, two_loss, rtol=1e-5)
    for one, two in zip(jax.tree.leaves(one_grads), jax.tree.leaves(two_grads), strict=True):
        np.testing.assert_allclose(one, two, rtol=1e-5, atol=1e-6)


def _largest_collective(compiled) -> int:
    """The most elements any cross-device operation of a compiled executable returns."""
    shapes = re.findall(
        r"= \w+\[([\d,]*)\][^=]*?\b(?:all-gather|all-reduce|collective-permute|all-to-all|"
        r"reduce-scatter)(?:-start)?\(",
        compiled.as_text(),
    )
    return max((int(np.prod([int(d) for d in s.split(",") if d])) for s in shapes), default=0)


def test_embedding_lookup_moves_only_the_table_between_devices():
    """On a 2 x 2 x 2 mesh the table is split (vocab over model, embed over fsdp) and the ids
    over data x fsdp. nnx.Embed's rows came out split over fsdp on the feature axis, and XLA
    all-gathered the (batch, length, features) activations to move them onto the batch axis
    ("Involuntary full rematerialization"; a (8, 64, 32) all-gather here, in every LRA token
    model's and the LM's step on the documented pod mesh). Now the lookup and its gradient
    move at most the table; values and gradients are nnx.Embed's."""
    from hgrn_jax.nn.embeddings import Embed
    from hgrn_jax.nn.initializers import logical

    mesh = sh.make_mesh(2, 2, 2)
    vocab, features = 18, 32
    init = logical(nnx.initializers.normal(1.0), ("vocab", "embed"))
    ids = np.random.default_rng(0).integers(0, vocab, (32, 64)).astype(np.int32)
    ids = sh.shard_batch({"ids": ids}, mesh)["ids"]
    results = []
    for cls in (Embed, nnx.Embed):
        graphdef, state = nnx.split(
            sh.create_sharded(
                lambda cls=cls: cls(vocab, features, embedding_init=init, rngs=nnx.Rngs(0)), mesh
            )
        )

        def loss(state, ids, graphdef=graphdef):
            return jnp.sum(jnp.sin(nnx.merge(graphdef, state)(ids)))

        with jax.set_mesh(mesh):
            compiled = jax.jit(jax.value_and_grad(loss)).lower(state, ids).compile()
            results.append((_largest_collective(compiled), compiled(state, ids)))
    (moved, (value, grads)), (_, (reference, reference_grads)) = results
    assert moved <= vocab * features, moved
    assert value == reference
    for leaf, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(reference_grads), strict=True):
        np.testing.assert_array_equal(leaf, ref)
