"""The grain pipeline over random-access arrays: each example once per epoch over all processes,
and exact resumption from the iterator's saved state."""

from __future__ import annotations

import numpy as np
import pytest

from hgrn_jax.data import grain_pipeline

N, BATCH, PROCESSES = 48, 8, 2


def source() -> grain_pipeline.ArraySource:
    return grain_pipeline.ArraySource(
        {"inputs": np.arange(N * 3).reshape(N, 3), "labels": np.arange(N, dtype=np.int32)}
    )


def batches(process_index: int, count: int, **kwargs) -> list[dict[str, np.ndarray]]:
    loader = grain_pipeline.train_loader(
        source(),
        seed=7,
        batch_size=BATCH,
        process_index=process_index,
        process_count=PROCESSES,
        **kwargs,
    )
    iterator = iter(loader)
    return [next(iterator) for _ in range(count)]


def test_every_example_once_per_epoch_over_all_processes():
    steps = N // BATCH  # one epoch: each process reads its N / 2 records in batches of 4
    seen = np.concatenate([b["labels"] for p in range(PROCESSES) for b in batches(p, steps)])
    assert sorted(seen.tolist()) == list(range(N))
    first = batches(0, 1)[0]
    assert first["inputs"].shape == (BATCH // PROCESSES, 3)
    np.testing.assert_array_equal(first["inputs"][:, 0], first["labels"] * 3)  # rows intact
    two_epochs = np.concatenate([b["labels"] for b in batches(0, 2 * steps)])
    assert sorted(two_epochs[: N // 2]) == sorted(two_epochs[N // 2 :])  # the same shard
    assert two_epochs[: N // 2].tolist() != two_epochs[N // 2 :].tolist()  # reshuffled


def test_resuming_from_the_saved_state_continues_exactly():
    loader = grain_pipeline.train_loader(
        source(), seed=7, batch_size=BATCH, process_index=1, process_count=PROCESSES
    )
    iterator = iter(loader)
    for _ in range(5):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator)["labels"] for _ in range(6)]
    resumed = iter(
        grain_pipeline.train_loader(
            source(), seed=7, batch_size=BATCH, process_index=1, process_count=PROCESSES
        )
    )
    resumed.set_state(state)
    np.testing.assert_array_equal([next(resumed)["labels"] for _ in range(6)], expected)


def test_a_transform_runs_on_every_record_and_bad_sizes_are_errors():
    doubled = batches(0, 1, transform=lambda r: {**r, "labels": r["labels"] * 2})[0]
    plain = batches(0, 1)[0]
    np.testing.assert_array_equal(doubled["labels"], plain["labels"] * 2)
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        grain_pipeline.train_loader(source(), seed=0, batch_size=7, process_count=2)
    with pytest.raises(ValueError, match="one length"):
        grain_pipeline.ArraySource({"a": np.zeros(3), "b": np.zeros(4)})
