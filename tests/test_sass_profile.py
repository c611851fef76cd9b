"""bench/sass_profile.py: loops, instruction classes and source lines read
from nvdisasm output (a hand-written excerpt in nvdisasm's format; the real
disassembly needs nvcc and the in-place build, see the module)."""

from __future__ import annotations

from bench import sass_profile as sp

EXCERPT = """
//--------------------- .text._ZN12flashsemicrf4cuda14forward_kernelIfLb1EEEvNS_13ForwardParamsENS0_5ArenaE --------------------------
.text._ZN12flashsemicrf4cuda14forward_kernelIfLb1EEEvNS_13ForwardParamsENS0_5ArenaE:
	//## File "/x/csrc/cuda/forward_kernel.cuh", line 10
        /*0000*/                   LDC R1, c[0x0][0x28] ;
.L_x_1:
	//## File "/x/csrc/cuda/forward_kernel.cuh", line 20
        /*0010*/                   LD.E R2, desc[UR4][R4.64] ;
        /*0020*/                   LDS R3, [R5] ;
.L_x_2:
	//## File "/x/csrc/semicrf.h", line 97
        /*0030*/                   FFMA R2, R2, R3, R2 ;
        /*0040*/                   MUFU.EX2 R6, R2 ;
        /*0050*/               @P0 BRA `(.L_x_2) ;
	//## File "/x/csrc/cuda/forward_kernel.cuh", line 30
        /*0060*/                   SHFL.BFLY PT, R7, R6, 0x10, 0x1f ;
        /*0070*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0080*/                   CALL.REL.NOINC `($__internal_18_$__cuda_sm20_rem_s64) ;
        /*0090*/              @!P1 BRA `(.L_x_1) ;
        /*00a0*/                   EXIT ;
"""


def test_loops_nest_and_count_by_class():
    kernels = sp.parse(EXCERPT)
    assert list(kernels) == ["forward_kernel<float, true>"]
    k = kernels["forward_kernel<float, true>"]
    assert len(k.instructions) == 11
    loops = k.loops()
    assert [(lp.first, lp.last, lp.depth, lp.innermost) for lp in loops] == [
        (1, 9, 0, False), (3, 5, 1, True)]
    inner = k.counts(3, 5)
    assert inner == {"fp32": 1, "mufu (exp/log/rcp)": 1, "branch/sync": 1}
    outer = k.counts(1, 9)
    assert outer["load generic"] == 1 and outer["load shared"] == 1
    assert outer["shuffle"] == 1 and outer["barrier"] == 1 and outer["call"] == 1
    assert k.sources(3, 5) == [("semicrf.h:97", 3)]
    assert k.calls() == {"__cuda_sm20_rem_s64": 1}


def test_kernel_names_read_their_template_arguments():
    assert sp.demangle("_ZN12flashsemicrf4cuda15backward_kernelIdLb0EEEvNS_14BackwardParamsE") \
        == "backward_kernel<double, false>"
    assert sp.demangle("_ZN12flashsemicrf4cuda14forward_kernelIfLb1ELb0EEEvNS_13ForwardParamsE") \
        == "forward_kernel<float, true, false>"
    assert sp.demangle("_Z3foov") == "_Z3foov"


def test_report_lists_each_loop_once():
    text = sp.report(sp.parse(EXCERPT), None, min_loop=1)
    rows = [ln for ln in text.splitlines() if ln.startswith("| 0x")]
    assert len(rows) == 2
    assert "__cuda_sm20_rem_s64 ×1" in text


INLINED = """
.text._ZN12flashsemicrf4cuda18exp_blocked_kernelIfLb1EEEvNS_13ForwardParamsENS0_5ArenaEPi:
	//## File "/x/csrc/cuda/blocked.cuh", line 30
        /*0000*/                   LDC R1, c[0x0][0x28] ;
	//## File "/x/csrc/semicrf.h", line 5 inlined at "/x/csrc/cuda/blocked.cuh", line 4
	//## File "/x/csrc/cuda/blocked.cuh", line 4 inlined at "/x/csrc/cuda/blocked.cuh", line 31
	//## File "/x/csrc/cuda/blocked.cuh", line 31
        /*0010*/                   FFMA R2, R2, R3, R2 ;
        /*0020*/                   REDUX.MAX.S32 UR4, R2 ;
	//## File "/x/csrc/cuda/blocked.cuh", line 10 inlined at "/x/csrc/cuda/blocked.cuh", line 32
	//## File "/x/csrc/cuda/blocked.cuh", line 32
        /*0030*/                   DFMA R4, R4, R6, R4 ;
	//## File "/x/csrc/cuda/blocked.cuh", line 14 inlined at "/x/csrc/cuda/blocked.cuh", line 3
	//## File "/x/csrc/cuda/blocked.cuh", line 3 inlined at "/x/csrc/cuda/blocked.cuh", line 31
	//## File "/x/csrc/cuda/blocked.cuh", line 31
        /*0038*/                   FMUL R2, R2, R3 ;
	//## File "/x/csrc/cuda/blocked.cuh", line 32
        /*0040*/                   EXIT ;
"""

SOURCE = """struct S {
  __device__ void ends() {
    helper();
    x = 1;
  }

  __device__ static int helper();
  __device__ void advance(int k) const {
    y = k;
    z = k;
  }
  __device__ static int helper2() {
    return 2;
  }
};
"""


def test_inline_chains_attribute_instructions_to_functions():
    k = sp.parse(INLINED)["exp_blocked_kernel<float, true>"]
    # The innermost record names the source line; the chain keeps every level.
    assert k.instructions[1].source == "semicrf.h:5"
    assert k.instructions[1].chain == (("/x/csrc/semicrf.h", 5), ("/x/csrc/cuda/blocked.cuh", 4),
                                       ("/x/csrc/cuda/blocked.cuh", 4),
                                       ("/x/csrc/cuda/blocked.cuh", 31),
                                       ("/x/csrc/cuda/blocked.cuh", 31))
    ranges = sp.function_ranges(SOURCE)
    assert ranges == [(2, 5, "ends"), (8, 11, "advance"), (12, 14, "helper2")]  # a declaration
    by = k.by_function("blocked.cuh", ranges)
    # helper2, inlined into ends, counts with ends (the outermost).
    assert by["ends"] == {"fp32": 2, "vote/match": 1}
    assert "helper2" not in by
    assert by["advance"] == {"fp64": 1}
    assert by["(rest)"] == {"load const": 1, "branch/sync": 1}
