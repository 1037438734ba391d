"""What a resumed run's records say: TensorBoard's curves after a resume from a checkpoint older
than the last records, and the config changes a resume accepted (fast, no training)."""

from __future__ import annotations

import struct
from pathlib import Path

from tensorboardX.proto import event_pb2

from hgrn_jax.training.logging import MetricsWriter


def _events(path: Path) -> list[event_pb2.Event]:
    """The events of one TensorBoard event file (TFRecord frames: length, its CRC, the
    serialized Event, its CRC)."""
    data, offset, events = path.read_bytes(), 0, []
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        event = event_pb2.Event()
        event.ParseFromString(data[offset + 12 : offset + 12 + length])
        events.append(event)
        offset += 12 + length + 4
    return events


def shown_by_tensorboard(folder: Path) -> dict[str, list[int]]:
    """The steps of each scalar tag as TensorBoard shows them: the event files in their order,
    a ``SessionLog.START`` purging every point at or after its step."""
    shown: dict[str, list[int]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in _events(path):
            if event.HasField("session_log") and event.session_log.status == 1:  # START
                shown = {tag: [s for s in steps if s < event.step] for tag, steps in shown.items()}
            for value in event.summary.value:
                shown.setdefault(value.tag, []).append(event.step)
    return shown


def test_tensorboard_hides_the_points_a_resumed_run_writes_again(tmp_path):
    """A run killed at step 5 after its checkpoint at step 3 resumes from 3 and writes steps
    4 and 5 again: metrics.jsonl was rewound, but TensorBoard's append-only event files kept
    the dead run's 4 and 5, and every curve showed those steps twice."""
    killed = MetricsWriter(tmp_path)
    killed.rewind(0)
    for step in range(1, 6):
        killed.write(step, "train", {"loss": 1.0 / step})
    killed.write(3, "val", {"loss": 0.5})
    killed.write(5, "val", {"loss": 0.4})  # an evaluation whose checkpoint did not commit
    killed.close()

    resumed = MetricsWriter(tmp_path)
    resumed.rewind(3)
    for step in range(4, 7):
        resumed.write(step, "train", {"loss": 2.0 / step})
    resumed.write(6, "val", {"loss": 0.3})
    resumed.close()

    assert shown_by_tensorboard(tmp_path / "tensorboard") == {
        "train/loss": [1, 2, 3, 4, 5, 6],
        "val/loss": [3, 6],
    }


def test_the_config_changes_a_resume_accepted_are_recorded_with_its_start(tmp_path):
    """A resume with a new learning rate and weight decay rewrites config.json with them; the
    old values lived on only in the checkpoints, which the keep policy deletes, and in the
    warning on stderr: nothing in the run's folder said which steps trained with what. The
    start record in events.jsonl now keeps the lines the check printed."""
    import json
    import types

    import jax
    import pytest
    from flax import nnx
    from toy_task import toy_config

    from hgrn_jax.training.logging import write_config
    from hgrn_jax.training.loop import Run, prepare_workdir
    from hgrn_jax.training.workdir import ConfigChangeWarning

    config = toy_config()
    write_config(tmp_path, config)
    (tmp_path / "checkpoints" / "30").mkdir(parents=True)  # a committed checkpoint's folder
    config.optimizer.learning_rate = 0.005
    config.num_train_steps = 40
    with pytest.warns(ConfigChangeWarning) as caught:
        lock = prepare_workdir(tmp_path, config)
    try:
        graphdef, _ = nnx.split(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
        run = types.SimpleNamespace(
            writer=MetricsWriter(tmp_path), lock=lock, started=False, graphdef=graphdef
        )
        Run.start(run, 30)
        run.writer.close()
    finally:
        lock.release()
    (started,) = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert started["event"] == "started" and started["step"] == 30
    assert (started["devices"], started["processes"]) == (jax.device_count(), 1)
    assert started["model_class"] == "flax.nnx.nn.linear.Linear"
    assert started["notes"] == [str(w.message) for w in caught]
    assert "optimizer.learning_rate: 0.01 -> 0.005" in started["notes"][0]


def test_a_config_json_edited_after_the_last_save_is_named_as_such(tmp_path):
    """A user changes model.features in a run's config.json and reruns the run's command. The
    refusal blamed the command's values ("checkpoints cannot continue with the new values
    (model.features: 32 -> 16)": they can, they were saved with 16) and offered restart
    first, which sets the run aside. It now says config.json was edited after the newest
    checkpoint's save, which the command matches, and how to resume that checkpoint."""
    import json

    import pytest
    from toy_task import toy_config

    from hgrn_jax.training.logging import config_as_json, write_config
    from hgrn_jax.training.workdir import ConfigChangedError, check_resume

    config = toy_config()
    copy = tmp_path / "checkpoints" / "30" / "config" / "metadata"
    copy.parent.mkdir(parents=True)
    copy.write_text(json.dumps(config_as_json(config)))
    edited = config_as_json(config)
    edited["model"]["features"] = 32
    write_config(tmp_path, edited)
    before = (tmp_path / "config.json").read_bytes()
    with pytest.raises(
        ConfigChangedError,
        match=rf"config\.json differs from the config its newest checkpoint was saved with "
        rf"\({copy}\), which the new config matches \(model\.features: 32 -> 16\): config\.json "
        r"was edited after that save .* rerun with --config\.resume=force",
    ):
        check_resume(tmp_path, config)
    assert (tmp_path / "config.json").read_bytes() == before

    config.model.features = 24  # a new value: neither config.json's nor the checkpoint's
    with pytest.raises(ConfigChangedError, match="checkpoints cannot continue with the new"):
        check_resume(tmp_path, config)


def test_a_tensorboard_write_that_fails_stops_the_run_instead_of_hanging_it(tmp_path, monkeypatch):
    """A full disk (or quota) met by tensorboardX's writer thread (its timed flush; the flush
    after each record, in the run's thread, mostly met it first): the thread died with a
    traceback, its queue filled, and the run hung in a later record until the step watchdog
    ended it 30 minutes later, saving nothing. The failed write now raises in the run's own
    thread (which stops the run naming the full disk); the records before it are kept."""
    import errno
    import threading

    from tensorboardX import event_file_writer

    real = event_file_writer.EventsWriter.write_event
    written = []

    def write_event(self, event):
        if len(written) >= 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(event.step)
        return real(self, event)

    monkeypatch.setattr(event_file_writer.EventsWriter, "write_event", write_event)
    writer, outcome = MetricsWriter(tmp_path), []

    def log() -> None:
        try:
            for step in range(1, 40):
                writer.write(step, "train", {"loss": 1.0})
        except OSError as error:
            outcome.append(error)

    thread = threading.Thread(target=log, daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive(), "the run hung in MetricsWriter.write"
    assert [error.errno for error in outcome] == [errno.ENOSPC]
    assert shown_by_tensorboard(tmp_path / "tensorboard") == {"train/loss": [1, 2, 3]}
    writer.close()


def test_a_run_whose_writers_fail_to_close_still_finishes_its_checkpoint_saves():
    """TensorBoard's events are written in the run's thread, so closing them can fail (a full
    disk, an I/O error on a network file system); the checkpoint manager, whose close waits for
    the save in flight, was then never closed, and the process exited past that save."""
    import errno
    import types

    import pytest

    from hgrn_jax.training.loop import Run

    closed = []

    def fail() -> None:
        raise OSError(errno.EIO, "Input/output error")

    run = types.SimpleNamespace(
        writer=types.SimpleNamespace(close=fail),
        checkpoints=types.SimpleNamespace(close=lambda: closed.append("checkpoints")),
    )
    with pytest.raises(OSError, match="Input/output error"):
        Run.close(run)
    assert closed == ["checkpoints"]
