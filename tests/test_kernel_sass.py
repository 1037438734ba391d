"""benchmarks/kernel_sass.py's reading of Pallas's debug output and of machine code (the parts
that need no Triton): the time loop found, and its memory round trips counted."""

from __future__ import annotations

from benchmarks.kernel_sass import round_trips, sass_instructions, storing_loop, triton_modules

# cuobjdump -sass lines: a load-compute-store loop (one step per iteration, unrolled by 2) whose
# second step loads after the first step's store, then a loop that only loads.
SASS = """
        /*0100*/                   LDG.E R2, desc[UR8][R4.64] ;                 /* 0x0 */
        /*0110*/                   LDG.E R3, desc[UR8][R6.64] ;                 /* 0x0 */
        /*0120*/                   FFMA R8, R8, R2, R3 ;                        /* 0x0 */
        /*0130*/                   STG.E desc[UR8][R10.64], R8 ;                /* 0x0 */
        /*0140*/                   LDG.E.U16 R2, desc[UR8][R4.64+0x100] ;       /* 0x0 */
        /*0150*/                   LDG.E R3, desc[UR8][R6.64+0x100] ;           /* 0x0 */
        /*0160*/                   FFMA R8, R8, R2, R3 ;                        /* 0x0 */
        /*0170*/                   STG.E desc[UR8][R10.64+0x100], R8 ;          /* 0x0 */
        /*0180*/              @!P0 BRA 0x100 ;                                  /* 0x0 */
        /*0190*/                   LDG.E R2, desc[UR8][R4.64] ;                 /* 0x0 */
        /*01a0*/                   FFMA R8, R8, R2, R8 ;                        /* 0x0 */
        /*01b0*/               @P1 BRA 0x190 ;                                  /* 0x0 */
        /*01c0*/                   STG.E desc[UR8][R12.64], R8 ;                /* 0x0 */
        /*01d0*/                   EXIT ;                                       /* 0x0 */
"""


def test_the_storing_loop_and_its_round_trips():
    instructions = sass_instructions(SASS)
    assert [i.opcode for i in instructions][:4] == ["LDG.E", "LDG.E", "FFMA", "STG.E"]
    assert instructions[8].target == 0x100 and instructions[11].target == 0x190
    body = storing_loop(instructions)
    assert [i.address for i in (body[0], body[-1])] == [0x100, 0x180]
    assert round_trips(body) == 2  # the second step's loads wait for the first step's store
    ahead = [body[k] for k in (0, 1, 4, 5, 2, 3, 6, 7, 8)]  # both steps' loads first
    assert round_trips(ahead) == 1
    assert storing_loop(instructions[9:12]) is None  # a loop without stores


def test_triton_modules_come_out_parseable():
    printed = """The Triton module for pallas_call linear_recurrence_forward at x.py:1:
#loc = [unknown]
module @linear_recurrence_forward {
  tt.func public @linear_recurrence_forward(%arg0: !tt.ptr<f32> {tt.divisibility = 32 : i32} [unknown]) {
    %c4_i32 = arith.constant 4 : i32 "convert_element_type:"
    %1 = tt.load %0 : tensor<1x32x!tt.ptr<f32>> "get:"(#loc174)
    tt.store %0, %1 : tensor<1x32x!tt.ptr<f32>> "swap:"(#loc159)
    tt.return [unknown]
  } [unknown]
} [unknown]
The kernel jaxpr for pallas_call linear_recurrence_backward at x.py:2:
"""
    ((name, text),) = triton_modules(printed).items()
    assert name == "linear_recurrence_forward"
    assert text.splitlines()[0] == "module @linear_recurrence_forward {"
    assert text.splitlines()[-1] == "}"
    for leftover in ("[unknown]", "#loc", '"get:"', '"swap:"', '"convert_element_type:"'):
        assert leftover not in text, leftover
    assert "%1 = tt.load %0 : tensor<1x32x!tt.ptr<f32>>\n" in text
