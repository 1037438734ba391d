"""benchmarks/step_trace.py: XLA operations credited to the Python function that emitted them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from benchmarks.step_trace import attribute, entry_instructions, source_of


def _inner_matmul(x: jax.Array) -> jax.Array:
    return jnp.sin(x @ x.T) @ x


def _outer(x: jax.Array) -> jax.Array:
    return _inner_matmul(x) + jnp.cumsum(x, axis=0)


def _loss(x: jax.Array) -> jax.Array:
    def body(carry, row):
        carry = carry * 0.5 + row
        return carry, carry

    _, states = jax.lax.scan(body, jnp.zeros(x.shape[1]), _outer(x))
    return jnp.sum(states**2)


@pytest.fixture(scope="module")
def step():
    return jax.jit(jax.grad(_loss)), jnp.linspace(0.0, 1.0, 64 * 48).reshape(64, 48)


def test_instructions_carry_their_python_stack_innermost_first(step):
    fn, x = step
    instructions = entry_instructions(fn.lower(x).compile().as_text())
    sources = {source_of(i, "tests") for i in instructions.values()}
    # The matmul is credited to the function that wrote it, not to its caller or to the loss.
    assert "test_step_trace.py:_inner_matmul" in sources, sources
    stacks = [i.stack for i in instructions.values() if i.stack]
    assert stacks
    for stack in stacks:
        functions = [frame.function for frame in stack]
        if "_inner_matmul" in functions:
            # Parents follow children: the caller chain reads outwards to the loss.
            assert functions.index("_outer") > functions.index("_inner_matmul"), functions
            assert functions.index("_loss") > functions.index("_outer"), functions
    assert any(i.backward for i in instructions.values())
    assert any(i.loop for i in instructions.values())


def test_attribute_splits_the_step_by_source_and_pass(step):
    fn, x = step
    rows = attribute(fn, x, rounds=1, project="tests")
    assert rows == sorted(rows, key=lambda row: -row["ms"])
    assert sum(row["share"] for row in rows) == pytest.approx(1.0)
    passes = {(row["source"], row["pass"]) for row in rows}
    assert ("test_step_trace.py:_inner_matmul", "forward") in passes, passes
    assert ("test_step_trace.py:_inner_matmul", "backward") in passes, passes
    # The scan's loop is one operation credited to the loss, with its body's time inside.
    assert sum(row["loops"] for row in rows if row["source"] == "test_step_trace.py:_loss") >= 1


_LOOP_HLO = """HloModule m

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %h = f32[8]{0} get-tuple-element(%p), index=1
  %next = s32[] fusion(%i), kind=kLoop, calls=%inc
  %step = f32[8]{0} fusion(%h), kind=kLoop, calls=%mul
  ROOT %out = (s32[], f32[8]{0}) tuple(%next, %step)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(1000)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%loop (t: (s32[], f32[8])) -> (s32[], f32[8]) {
  %t = (s32[], f32[8]{0}) parameter(0)
  ROOT %w = (s32[], f32[8]{0}) while(%t), condition=%cond, body=%body
}

ENTRY %main (x: f32[8]) -> f32[8] {
  %x = f32[8]{0} parameter(0)
  %zero = s32[] constant(0)
  %y = f32[8]{0} fusion(%x), kind=kLoop, calls=%sin
  %t = (s32[], f32[8]{0}) tuple(%zero, %y)
  %c = (s32[], f32[8]{0}) call(%t), to_apply=%loop
  %h = f32[8]{0} get-tuple-element(%c), index=1
  ROOT %r = f32[8]{0} custom-call(%h), custom_call_target="__gpu$xla.gpu.triton"
}
"""


class _Compiled:
    def __init__(self, text: str):
        self.text = text

    def as_text(self) -> str:
        return self.text


def test_step_op_counts_follow_calls_and_loops_once_and_skip_bookkeeping():
    from benchmarks.common import step_op_counts

    # Entry: a fusion and a custom call; through the call, one loop whose body holds two
    # fusions and whose condition a compare, each counted once whatever the trip count.
    assert step_op_counts(_Compiled(_LOOP_HLO)) == {
        "fusion": 3,
        "custom-call": 1,
        "while": 1,
        "compare": 1,
    }
    x = jnp.ones((16, 8))
    # Two elementwise ops fuse into one kernel (a lone op may stay unfused, e.g. under XLA's
    # older CPU emitters, which the suite compiles with).
    assert step_op_counts(jax.jit(lambda x: jnp.sin(x) * 2).lower(x).compile()) == {"fusion": 1}
    # A real step: the scan forward and its transpose are two loops.
    assert step_op_counts(jax.jit(jax.grad(_loss)).lower(x).compile())["while"] == 2


def test_device_activity_reads_kernel_events_of_the_accelerator_only():
    from benchmarks.device_time import busy_seconds, device_activity

    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0"}},
        {"ph": "X", "pid": 1, "name": "ExecuteOnStream", "ts": 0.0, "dur": 500.0},
        # Two streams: kernels overlapping in time count once in the busy time.
        {"ph": "X", "pid": 7, "tid": 1, "name": "fusion_1", "ts": 10.0, "dur": 20.0},
        {"ph": "X", "pid": 7, "tid": 2, "name": "gemm", "ts": 20.0, "dur": 30.0},
        {"ph": "X", "pid": 7, "tid": 1, "name": "fusion_1", "ts": 100.0, "dur": 10.0},
    ]
    activity = device_activity(events)
    assert activity["kernels"] == 3
    assert activity["busy_s"] == pytest.approx(50e-6)  # [10, 50] and [100, 110] microseconds
    assert activity["by_name"]["fusion_1"] == pytest.approx(30e-6)
    assert device_activity(events[:3]) is None  # host events only: no device activity
    assert busy_seconds([(0.0, 1.0), (0.5, 2.0), (3.0, 4.0)]) == pytest.approx(3.0)
    assert busy_seconds([]) == 0.0
