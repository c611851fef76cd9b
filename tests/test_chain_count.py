"""bench/chain_count.py: SASS basic blocks weighted by gcov's line counts
(a hand-written nvdisasm excerpt and gcov report; the real run needs nvcc,
gcc --coverage and the emulator, see the module)."""

from __future__ import annotations

from bench import chain_count as cc
from bench import sass_profile as sp

# A function `step` (lines 10-20 of chain.cuh) called from a kernel (line 40):
# straight-line code at lines 11 and 12, a branch taken at one step in four
# (line 13), an inner loop at line 15 and a helper from another file inlined
# at line 12.
SOURCE = """\
x
""" * 9 + """\
  __device__ void step(int k) {
    a();
    b();
    if (rare) c();
    d();
    for (int i = 0; i < n; ++i) e(i);
    f();
  }
""" + "x\n" * 30

EXCERPT = """
.text._ZN12flashsemicrf4cuda6kernelIfLb1EEEvv:
	//## File "/x/csrc/cuda/chain.cuh", line 11 inlined at "/x/csrc/cuda/chain.cuh", line 40
        /*0000*/                   FADD R1, R1, R2 ;
	//## File "/x/csrc/exp_domain.h", line 7 inlined at "/x/csrc/cuda/chain.cuh", line 12
        /*0010*/                   FMUL R1, R1, R2 ;
        /*0020*/                   FMUL R1, R1, R3 ;
	//## File "/x/csrc/cuda/chain.cuh", line 13 inlined at "/x/csrc/cuda/chain.cuh", line 40
        /*0030*/               @P0 BRA `(.L_x_1) ;
        /*0040*/                   DADD R4, R4, R6 ;
.L_x_1:
	//## File "/x/csrc/cuda/chain.cuh", line 14 inlined at "/x/csrc/cuda/chain.cuh", line 40
        /*0050*/                   IADD3 R8, R8, 0x1, RZ ;
.L_x_2:
	//## File "/x/csrc/cuda/chain.cuh", line 15 inlined at "/x/csrc/cuda/chain.cuh", line 40
        /*0060*/                   FFMA R9, R9, R9, R9 ;
        /*0070*/                   FFMA R9, R9, R9, R9 ;
        /*0080*/               @P1 BRA `(.L_x_2) ;
	//## File "/x/csrc/cuda/chain.cuh", line 40
        /*0090*/                   EXIT ;
"""

GCOV = """\
        -:    0:Source:csrc/cuda/chain.cuh
       64:   11:    a();
       64:   12:    b();
       64:   13:    if (rare) c();
       16:   13-block
    #####:   99:    never();
      512:   15:    for (int i = 0; i < n; ++i) e(i);
"""


def test_blocks_cut_at_labels_and_after_branches():
    kernel = sp.parse(EXCERPT)["kernel<float, true>"]
    sizes = [len(b) for b in cc.basic_blocks(kernel)]
    assert sizes == [4, 1, 1, 3, 1]


def test_counts_weigh_blocks_and_keep_inner_loops_apart():
    counts = cc.gcov_counts(GCOV)
    assert counts == {11: 64, 12: 64, 13: 64, 15: 512}
    kernel = sp.parse(EXCERPT)["kernel<float, true>"]
    ranges = sp.function_ranges(SOURCE)
    assert ranges == [(10, 17, "step")]
    # 16 steps of 4 lanes: lines 11-13 run once a step, line 15 eight times.
    scaled = {"chain.cuh": {n: c / 64 for n, c in counts.items()}}
    rows, loops = cc.per_step(kernel, scaled, "chain.cuh", {"chain.cuh": ranges},
                              functions=("step",))
    # The first block: 4 instructions once a step (the inlined helper's two
    # at their call site, line 12); the branch's DADD: once, at line 13's
    # count (a rare branch leans high, as the module says); line 14's block:
    # never run in gcov's report, 0.
    static, dynamic = rows["step"]
    assert static == 9  # every instruction but EXIT (line 40 is outside step)
    assert dynamic == 4 + 1 + 0
    assert loops == {15: ("step", 8.0, 3)}


HELPER = "x\n" * 4 + """\
HOST_DEVICE double helper(double v) {
  if (v > 0)
    return v * 2;  // line 7
  return 0;
}
"""


def test_an_inlined_helper_counts_at_the_share_of_calls_that_reach_it():
    kernel = sp.parse(EXCERPT)["kernel<float, true>"]
    assert sp.function_ranges(HELPER) == [(5, 9, "helper")]
    # The helper is entered 4 times a step over all its call sites, and its
    # line 7 runs once: the two instructions from it count a quarter each.
    counts = {"chain.cuh": {n: c / 64 for n, c in cc.gcov_counts(GCOV).items()},
              "exp_domain.h": {5: 4.0, 7: 1.0}}
    ranges = {"chain.cuh": sp.function_ranges(SOURCE), "exp_domain.h": sp.function_ranges(HELPER)}
    rows, _ = cc.per_step(kernel, counts, "chain.cuh", ranges, functions=("step",))
    assert rows["step"] == (9, 2 + 2 * 0.25 + 1 + 0)
