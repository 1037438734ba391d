"""The kernels of a compiled XLA executable, read from its optimized HLO text: what each one is,
the bytes of its operands and result, and the line of our code it came from.

On a GPU every instruction of the entry computation that does work (a fusion, a cuBLAS or
cuDNN call, a Pallas/Triton kernel, a copy) is one kernel launch per call, so this list is the
step as the device runs it. Used by ``benchmarks/gpu_compile.py``; works on any backend's HLO.
"""

from __future__ import annotations

import collections
import dataclasses
import re

from benchmarks.common import BOOKKEEPING_OPS, HLO_INSTRUCTION

# Bytes per element of HLO's element types.
_ELEMENT_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
_ARRAY = re.compile(r"\b(" + "|".join(_ELEMENT_BYTES) + r")\[([\d,]*)\]")
_OPERAND = re.compile(r"%([\w.\-]+)")
# Instructions that launch nothing: bookkeeping, and reading the device's own ids.
_NO_KERNEL = BOOKKEEPING_OPS | {"partition-id", "replica-id"}
# Custom-call targets of Pallas kernels: Triton's, and Mosaic GPU's ("mosaic_gpu_v2").
PALLAS_TARGETS = ("__gpu$xla.gpu.triton", "mosaic_gpu")
# Where a kernel's line of code is looked for, innermost frame first.
OUR_CODE = ("/hgrn_jax/", "/benchmarks/", "/experiments/")


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One instruction of the entry computation that does work (one launch on a GPU)."""

    name: str
    opcode: str  # "fusion", "custom-call", "copy", "while", ...
    kind: str  # a fusion's kind (kLoop, kInput, kCustom, ...), else ""
    target: str  # a custom call's target (PALLAS_TARGETS: a Pallas kernel), else ""
    operand_bytes: int  # of its distinct operands
    result_bytes: int
    site: str  # "path:line function" of the innermost frame in our code, else of any frame

    @property
    def is_pallas(self) -> bool:
        """A Pallas kernel: on Triton, or on Mosaic GPU."""
        return any(self.target.startswith(t) for t in PALLAS_TARGETS)

    @property
    def bytes(self) -> int:
        """Operands read once and the result written once: the most HBM traffic the kernel
        needs (a kernel that reads part of an operand, a slice or a gather, moves less)."""
        return self.operand_bytes + self.result_bytes


def array_bytes(shape: str) -> int:
    """Bytes of an HLO shape string, ``f32[8,128]{1,0}`` or a tuple of them."""
    total = 0
    for element, dims in _ARRAY.findall(shape):
        count = 1
        for dim in filter(None, dims.split(",")):
            count *= int(dim)
        total += count * _ELEMENT_BYTES[element]
    return total


def _section(text: str, title: str) -> list[str]:
    """The lines of one of the HLO text's tables (``FileNames``, ``StackFrames``, ...)."""
    match = re.search(rf"^{title}\n(.*?)(?:\n\n|\Z)", text, re.M | re.S)
    return match.group(1).splitlines() if match else []


def _fields(line: str) -> dict[str, int]:
    return {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", line)}


class _Frames:
    """The HLO text's source locations: a ``stack_frame_id`` to the line of code it names."""

    def __init__(self, text: str):
        def names(title):
            return {
                int(line.split(None, 1)[0]): line.split(None, 1)[1].strip().strip('"')
                for line in _section(text, title)
            }

        self.files = names("FileNames")
        self.functions = names("FunctionNames")
        self.locations = {
            int(line.split()[0]): _fields(line) for line in _section(text, "FileLocations")
        }
        self.frames = {
            int(line.split()[0]): _fields(line) for line in _section(text, "StackFrames")
        }

    def chain(self, frame_id: int) -> list[tuple[str, str, int]]:
        """``(file, function, line)`` from the innermost frame outwards."""
        chain, seen = [], set()
        while frame_id in self.frames and frame_id not in seen:
            seen.add(frame_id)
            frame = self.frames[frame_id]
            location = self.locations.get(frame.get("file_location_id", -1), {})
            chain.append(
                (
                    self.files.get(location.get("file_name_id", -1), "?"),
                    self.functions.get(location.get("function_name_id", -1), "?"),
                    location.get("line", 0),
                )
            )
            frame_id = frame.get("parent_frame_id", 0)
        return chain

    def site(self, frame_id: int | None) -> str:
        """The innermost frame in our code (``OUR_CODE``) as ``path:line function``, with the
        path from our package's directory on; else the innermost frame. The HLO keeps a short
        call chain: a kernel from inside a Flax or optax function is often named by that
        library's line alone (``flax/nnx/nn/linear.py:422 Linear.__call__``)."""
        chain = self.chain(frame_id) if frame_id is not None else []
        if not chain:
            return "(no source)"
        for file, function, line in chain:
            # The marker that starts latest names the package: a clone may itself be called
            # hgrn_jax (.../hgrn_jax/benchmarks/x.py, .../hgrn_jax/hgrn_jax/ops/x.py).
            start, marker = max((file.rfind(m), m) for m in OUR_CODE)
            if start >= 0:
                return f"{marker.strip('/')}/{file[start + len(marker) :]}:{line} {function}"
        file, function, line = chain[0]
        return f"{file.split('site-packages/')[-1]}:{line} {function}"


def entry_kernels(text: str) -> list[Kernel]:
    """The kernels of the entry computation of an optimized HLO module (``compiled.as_text()``),
    in program order. Loops count as one ``while`` kernel each (their bodies are not entered)."""
    match = re.search(r"^ENTRY .*?^\}", text, re.M | re.S)
    if match is None:
        raise ValueError("no ENTRY computation in the HLO text")
    frames = _Frames(text)
    sizes: dict[str, int] = {}
    kernels = []
    for line in match.group(0).splitlines()[1:]:
        instruction = HLO_INSTRUCTION.match(line)
        if instruction is None:
            continue
        name, shape, opcode, rest = instruction.group("name", "shape", "opcode", "rest")
        sizes[name] = array_bytes(shape)
        if opcode in _NO_KERNEL:
            continue
        operands = dict.fromkeys(_OPERAND.findall(rest.split("), ", 1)[0]))
        kind = re.search(r"\bkind=(\w+)", rest)
        target = re.search(r'\bcustom_call_target="([^"]*)"', rest)
        frame = re.search(r"\bstack_frame_id=(\d+)", rest)
        kernels.append(
            Kernel(
                name=name,
                opcode=opcode,
                kind=kind.group(1) if kind else "",
                target=target.group(1) if target else "",
                operand_bytes=sum(sizes.get(o, 0) for o in operands),
                result_bytes=sizes[name],
                site=frames.site(int(frame.group(1)) if frame else None),
            )
        )
    return kernels


def by_site(kernels: list[Kernel]) -> list[tuple[str, int, int]]:
    """``(site, kernels, bytes)`` per line of code, most kernels first."""
    counts: collections.Counter[str] = collections.Counter()
    sizes: collections.Counter[str] = collections.Counter()
    for kernel in kernels:
        counts[kernel.site] += 1
        sizes[kernel.site] += kernel.bytes
    return [(site, count, sizes[site]) for site, count in counts.most_common()]
