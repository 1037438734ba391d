"""Where a jitted function's time goes, by the source line that made each XLA operation.

``attribute(fn, *args)`` compiles ``fn``, runs it under ``jax.profiler.trace`` and reads two
things back: the trace's per-operation durations (XLA:CPU runs each operation of the entry
computation as one "thunk" and traces it under the instruction's name) and the compiled HLO's
stack-frame tables (every instruction carries the Python stack that emitted it). Each thunk of
the entry computation is credited to its innermost frame in ``hgrn_jax`` (or, outside the
project, to its innermost frame at all), so a fusion of the norm's backward is credited to
``hgru.py:output`` and the optimizer's update to ``optax``. A ``while`` thunk (a scan's loop)
counts as one operation with everything its body ran.

Caveats, all visible in the numbers: thunks run concurrently on the CPU's threads, so the
summed thunk time exceeds the wall time of a step; tracing adds a fixed cost per traced
operation, and a loop's body is traced at every iteration, so loops read slower here than
untraced (time them untraced, e.g. ``profile_step.py``'s "scans alone").
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

_TABLE_ROW = re.compile(r"^(\d+) (.*)$")
_FIELD = re.compile(r"(\w+)=(\"[^\"]*\"|\d+)")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?, metadata=\{([^}]*)\}")


@dataclasses.dataclass(frozen=True)
class Frame:
    file: str
    function: str
    line: int

    def label(self) -> str:
        """``file.py:Class.method`` (a comprehension or closure counts as its function)."""
        return f"{Path(self.file).name}:{self.function.split('.<locals>')[0]}"


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One entry-computation instruction: its name, op_name and Python stack (innermost first)."""

    name: str
    op_name: str
    stack: tuple[Frame, ...]

    @property
    def backward(self) -> bool:
        """Emitted by the transpose (backward pass) of a JVP: ``transpose(jvp(...))``."""
        return "transpose(" in self.op_name

    @property
    def loop(self) -> bool:
        return self.op_name.endswith("/while") or self.name.startswith("while")


def _tables(hlo: str) -> dict[str, dict[int, str]]:
    """The HLO text's FileNames / FunctionNames / FileLocations / StackFrames tables."""
    tables: dict[str, dict[int, str]] = {}
    current = None
    for line in hlo.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = tables.setdefault(line, {})
        elif current is not None and (row := _TABLE_ROW.match(line)):
            current[int(row.group(1))] = row.group(2)
        elif current is not None and not line.strip():
            current = None
    return tables


def _stacks(tables: dict[str, dict[int, str]]) -> dict[int, tuple[Frame, ...]]:
    """``{stack_frame_id: frames innermost first}``."""

    def fields(text: str) -> dict[str, str | int]:
        return {
            key: value.strip('"') if value.startswith('"') else int(value)
            for key, value in _FIELD.findall(text)
        }

    files = {k: v.strip('"') for k, v in tables.get("FileNames", {}).items()}
    functions = {k: v.strip('"') for k, v in tables.get("FunctionNames", {}).items()}
    locations = {k: fields(v) for k, v in tables.get("FileLocations", {}).items()}
    frames = {k: fields(v) for k, v in tables.get("StackFrames", {}).items()}
    # XLA prints a frame's parent as the parent's row number plus one (0 or 1: none), which
    # shows as a frame naming itself; read it as printed if no frame does.
    shift = int(any(f.get("parent_frame_id") == k for k, f in frames.items()))
    stacks: dict[int, tuple[Frame, ...]] = {}
    for frame_id in frames:
        stack, seen = [], set()
        current = frame_id
        while current in frames and current not in seen:
            seen.add(current)
            location = locations[frames[current]["file_location_id"]]
            stack.append(
                Frame(
                    files[location["file_name_id"]],
                    functions[location["function_name_id"]],
                    location["line"],
                )
            )
            current = frames[current].get("parent_frame_id", 0) - shift
        stacks[frame_id] = tuple(stack)
    return stacks


def entry_instructions(hlo: str) -> dict[str, Instruction]:
    """``{name: Instruction}`` for the entry computation of a compiled module's HLO text."""
    stacks = _stacks(_tables(hlo))
    entry = hlo[hlo.index("\nENTRY ") :]
    entry = entry[: entry.index("\n}")]
    result = {}
    for line in entry.splitlines()[1:]:
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        meta = match.group(2)
        op_name = re.search(r'op_name="([^"]*)"', meta)
        frame = re.search(r"stack_frame_id=(\d+)", meta)
        result[match.group(1)] = Instruction(
            match.group(1),
            op_name.group(1) if op_name else "",
            stacks.get(int(frame.group(1)), ()) if frame else (),
        )
    return result


def source_of(instruction: Instruction, project: str = "hgrn_jax") -> str:
    """The label an instruction is credited to: its innermost frame in ``project`` (the file
    alone for ``project.ops``, whose kernels' forward and backward sit in different functions),
    else its innermost frame's package (``optax``, ``flax``, ...) and function, else its
    op_name."""
    for frame in instruction.stack:
        if f"/{project}/ops/" in frame.file:
            return Path(frame.file).name
        if f"/{project}/" in frame.file:
            return frame.label()
    for frame in instruction.stack:
        parts = Path(frame.file).parts
        if "site-packages" in parts:
            return f"{parts[parts.index('site-packages') + 1]}:{frame.function}"
    return instruction.op_name.rsplit("/", 1)[-1] or instruction.name


def thunk_durations(fn: Callable, args: tuple, rounds: int) -> dict[str, float]:
    """``{thunk name: fastest of rounds, seconds}`` for one call of ``fn(*args)`` per round;
    nested thunks (loop bodies) are summed per call too but the caller drops them."""
    jax.block_until_ready(fn(*args))
    best: dict[str, float] = {}
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as folder:
            with jax.profiler.trace(folder, create_perfetto_trace=True):
                jax.block_until_ready(fn(*args))
            (path,) = glob.glob(f"{folder}/**/*.trace.json.gz", recursive=True)
            with gzip.open(path) as f:
                events = json.load(f)["traceEvents"]
        totals: collections.Counter = collections.Counter()
        for event in events:
            if event.get("ph") == "X":
                totals[event["name"]] += event["dur"] * 1e-6
        for name, seconds in totals.items():
            best[name] = min(best.get(name, seconds), seconds)
    return best


def attribute(
    fn: Any, *args: Any, rounds: int = 3, project: str = "hgrn_jax"
) -> list[dict[str, Any]]:
    """Rows ``{source, pass, ms, share, ops, loops}``, largest first: the entry computation's
    thunk time of ``fn(*args)`` (a ``jax.jit``-ed function) per crediting source and pass
    (forward / backward), the fastest of ``rounds`` traced calls per thunk, credited to frames
    in the folder ``project`` (see :func:`source_of`). ``share`` is of the summed thunk time
    (see the module docstring)."""
    # The executable whose HLO is read is the one traced: the names are its instructions'.
    compiled = fn.lower(*args).compile()
    instructions = entry_instructions(compiled.as_text())
    durations = thunk_durations(compiled, args, rounds)
    groups: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0, 0])
    for name, seconds in durations.items():
        instruction = instructions.get(name)
        if instruction is None:
            continue
        key = (source_of(instruction, project), "backward" if instruction.backward else "forward")
        groups[key][0] += seconds
        groups[key][1] += 1
        groups[key][2] += instruction.loop
    total = sum(seconds for seconds, _, _ in groups.values())
    rows = [
        dict(source=source, **{"pass": pass_}, ms=s * 1e3, share=s / total, ops=n, loops=loops)
        for (source, pass_), (s, n, loops) in groups.items()
    ]
    return sorted(rows, key=lambda row: -row["ms"])
