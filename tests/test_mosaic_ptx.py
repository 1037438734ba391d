"""benchmarks/mosaic_ptx.py's reading of what Mosaic GPU dumps (the part that needs no CUDA
plugin): a kernel's ``ptxas`` report and its PTX instructions, per kernel in compile order."""

from __future__ import annotations

from benchmarks.mosaic_ptx import kernel_rows, ptx_counts, ptxas_usage

PTXAS = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'hgrn_forward_mosaic_gpu_kernel' for 'sm_90a'
ptxas info    : Function properties for hgrn_forward_mosaic_gpu_kernel
    8 bytes stack frame, 12 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 39 registers, used 2 barriers, 1 bytes smem
"""

# Two time steps of a forward block: loads, the serial fma, stores; then the block's commit
# (fence, barrier), its copy out (a plain bulk copy: a contiguous window) and the next block's
# copy in (a tensor copy), each behind a predicate.
PTX = """
// a comment: bar.sync 0;
.visible .entry hgrn_forward_mosaic_gpu_kernel(
	.loc	1 182 12
	ld.shared.b32 	%r36, [%rd21];
	ld.shared.b32 	%r44, [%rd21+16384];
	fma.rn.f32 	%r52, %r96, %r36, %r44;
	st.shared.b32 	[%rd21+32768], %r52;
	ld.shared.b32 	%r37, [%rd21+512];
	ld.shared.b32 	%r45, [%rd21+16896];
	fma.rn.f32 	%r53, %r37, %r52, %r45;
	st.shared.b32 	[%rd21+33280], %r53;
	fence.proxy.async.shared::cta;
	bar.sync %r29, 128;
          @%p12 cp.async.bulk.global.shared::cta.bulk_group [%rd38], [%rd22], %r30;
	cp.async.bulk.commit_group;
	cp.async.bulk.wait_group.read 	1;
	@!%p3 cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%r9], [%rd29, {%r93,%r10,%r11} ], [%r1];
	mul.f32 	%r71, %r70, %r62;
	add.rn.f32 	%r70, %r145, %r54;
"""


def test_ptxas_report():
    assert ptxas_usage(PTXAS) == {
        "registers": 39,
        "spill_bytes": 16,
        "stack_bytes": 8,
        "barriers": 2,
    }
    assert ptxas_usage("")["registers"] == 0  # no report: zeros, not an error


def test_ptx_counts_skip_comments_and_directives():
    assert ptx_counts(PTX) == {
        "bar_sync": 1,
        "shared_loads": 4,
        "shared_stores": 2,
        "tma_in": 1,
        "tma_out": 1,
        "float_ops": 4,
    }


def test_kernel_rows_in_compile_order(tmp_path):
    for name, ptx in [("hgrn_forward_10", PTX), ("hgrn_backward_summary_2", "bar.sync 1, 128;")]:
        (tmp_path / f"{name}.ptx").write_text(ptx)
    (tmp_path / "hgrn_forward_10.ptxas").write_text(PTXAS)
    (tmp_path / "hgrn_forward_10.mlir-passes.log").write_text("not read")
    rows = kernel_rows(tmp_path, block_rows=2)
    assert [row["kernel"] for row in rows] == ["backward_summary", "forward"]
    forward = rows[1]
    assert forward["registers"] == 39 and forward["shared_stores_per_row"] == 1.0
    assert forward["float_ops_per_row"] == 2.0 and rows[0]["registers"] == 0
