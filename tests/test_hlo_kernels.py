"""benchmarks/hlo_kernels.py: the kernels of a compiled step, their bytes and their source lines
(what benchmarks/gpu_compile.py reports for a GPU; checked here on CPU-compiled HLO and on a
GPU module's text)."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.hlo_kernels import array_bytes, by_site, entry_kernels


def _elementwise_then_matmul(x, y):
    z = jnp.sin(x) * 2 + y  # one elementwise fusion: reads x and y, writes z
    return z @ y.T


def test_array_bytes_of_arrays_and_tuples():
    assert array_bytes("f32[8,128]{1,0}") == 8 * 128 * 4
    assert array_bytes("(bf16[4,2]{1,0}, c64[3]{0}, pred[])") == 4 * 2 * 2 + 3 * 8 + 1
    assert array_bytes("token[]") == 0


def test_cpu_step_kernels_bytes_and_source_line():
    x = jnp.ones((256, 512), jnp.float32)
    compiled = jax.jit(_elementwise_then_matmul).lower(x, x).compile()
    kernels = entry_kernels(compiled.as_text())
    line = _elementwise_then_matmul.__code__.co_firstlineno + 1
    elementwise = [
        k
        for k in kernels
        if k.site.endswith(f"test_hlo_kernels.py:{line} _elementwise_then_matmul")
    ]
    assert len(elementwise) == 1, kernels
    assert elementwise[0].operand_bytes == 2 * x.nbytes  # x and y, each read once
    assert elementwise[0].result_bytes == x.nbytes
    assert len(kernels) == 2  # and the matmul
    assert sum(count for _, count, _ in by_site(kernels)) == len(kernels)


def test_sites_name_our_code_by_package_path_line_and_function():
    """The HGRU's complex decay (one line of hgru.py) is found by its line, path from the
    package on; a kernel of Flax's LayerNorm by flax's line, one of our Linear by ours."""
    from flax import nnx

    from hgrn_jax.nn import hgru

    source = Path(hgru.__file__).read_text().splitlines()
    line = 1 + next(
        i for i, text in enumerate(source) if "jax.lax.complex(lam * cos[phase]" in text
    )
    layer = hgru.HGRU(16, rngs=nnx.Rngs(0))
    x = jnp.ones((2, 32, 16), jnp.float32)
    compiled = jax.jit(lambda x: layer(x)).lower(x).compile()
    sites = {k.site for k in entry_kernels(compiled.as_text())}
    assert f"hgrn_jax/nn/hgru.py:{line} _HGRUBase.decay" in sites, sites
    assert any(s.startswith("flax/nnx/nn/normalization.py:") for s in sites), sites
    assert any(s.startswith("hgrn_jax/nn/linear.py:") for s in sites), sites


# The entry computation of a GPU step, shortened: a Pallas (Triton) kernel, a loop, a copy.
_GPU_MODULE = """HloModule jit_step, is_scheduled=true

FileNames
1 "/home/u/hgrn_jax/hgrn_jax/ops/pallas_recurrence.py"
3 "/home/u/hgrn_jax/benchmarks/train_throughput.py"
2 "/usr/lib/python3/site-packages/jax/_src/pallas/pallas_call.py"

FunctionNames
1 "pallas_linear_recurrence"
2 "_pallas_call"
3 "train_step_fn"

FileLocations
1 {file_name_id=1 function_name_id=1 line=929 end_line=929 column=4 end_column=9}
2 {file_name_id=2 function_name_id=2 line=77 end_line=77 column=4 end_column=9}
3 {file_name_id=3 function_name_id=3 line=337 end_line=337 column=4 end_column=9}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=1}
3 {file_location_id=3 parent_frame_id=3}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  ROOT %t = (s32[], f32[8]{0}) tuple(%p)
}

ENTRY %main (a: f32[8,4096,512], x: f32[8,4096,512]) -> f32[8,4096,512] {
  %a = f32[8,4096,512]{2,1,0} parameter(0)
  %x = f32[8,4096,512]{2,1,0} parameter(1)
  %kernel = f32[8,4096,512]{2,1,0} custom-call(%a, %x, %a), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="pallas_call" stack_frame_id=2}
  %init = (s32[], f32[8]{0}) tuple(%kernel)
  %loop = (s32[], f32[8]{0}) while(%init), condition=%cond, body=%body
  ROOT %copy.1 = f32[8,4096,512]{2,1,0} copy(%kernel), metadata={stack_frame_id=3}
}
"""


def test_gpu_module_pallas_kernel_loop_and_copy():
    kernels = entry_kernels(_GPU_MODULE)
    assert [k.opcode for k in kernels] == ["custom-call", "while", "copy"]
    kernel, loop, copy = kernels
    size = 8 * 4096 * 512 * 4
    assert kernel.target == "__gpu$xla.gpu.triton" and kernel.is_pallas
    assert not copy.is_pallas and not loop.is_pallas
    mosaic = entry_kernels(
        _GPU_MODULE.replace('"__gpu$xla.gpu.triton"', '"mosaic_gpu_v2", backend_config=""')
    )[0]
    assert mosaic.target == "mosaic_gpu_v2" and mosaic.is_pallas
    assert kernel.operand_bytes == 2 * size  # a is passed twice and read once
    assert kernel.result_bytes == size
    assert kernel.site == "hgrn_jax/ops/pallas_recurrence.py:929 pallas_linear_recurrence"
    # A clone called hgrn_jax: the package is named by the marker that starts latest.
    assert copy.bytes == 2 * size
    assert copy.site == "benchmarks/train_throughput.py:337 train_step_fn"
    assert loop.result_bytes == 4 + 8 * 4 and loop.site == "(no source)"


def test_no_entry_computation_is_an_error():
    with pytest.raises(ValueError, match="no ENTRY computation"):
        entry_kernels("HloModule empty\n")
