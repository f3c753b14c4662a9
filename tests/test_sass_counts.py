"""benchmarks/sass_counts.py's SASS parsing on a hand-written nvdisasm listing (no nvcc, milliseconds): the
innermost loops holding HMMA are found from the backward branches, nested loops without HMMA and loops outside
them are not, and the instruction classes and steps per loop are counted."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import sass_counts as sc  # noqa: E402

LISTING = """
.text._Z1kv:
        /*0000*/                   S2R R0, SR_TID.X ;
.L_x_0:
	//## File "/x/csrc/cuda/meta_block_kernels.cuh", line 10
        /*0010*/                   LDSM.16.M88.4 R4, [R2] ;
        /*0020*/                   HMMA.16816.F32.BF16 R8, R4, R6, R8 ;
	//## File "/x/include/crt/mma.hpp", line 99
        /*0030*/                   HMMA.16816.F32.BF16 R12, R4, R7, R12 ;
	//## File "/x/csrc/cuda/meta_block_kernels.cuh", line 12
        /*0040*/                   IMAD R2, R2, 0x2, R3 ;
        /*0050*/                   LOP3.LUT R5, R4, 0xffffe000, RZ, 0xc0, !PT ;
        /*0060*/                   FADD R6, R4, -R5 ;
        /*0070*/               @P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0080*/                   LDS R9, [R2] ;
        /*0090*/              @!P1 BRA `(.L_x_1) ;
        /*00a0*/                   EXIT ;
.text._Z1jv:
        /*0000*/                   MOV R1, R2 ;
"""


def test_loops_and_classes():
    funcs = sc.parse(LISTING)
    assert set(funcs) == {"_Z1kv", "_Z1jv"}
    code = funcs["_Z1kv"]
    loops = sc.loops(code)
    assert loops == [(1, 7)]  # the HMMA loop only (not the LDS loop after it)
    body = code[1:8]
    c = sc.classify(body)
    assert (c["instr"], c["hmma"], c["lds"], c["int_addr"], c["lop3"], c["fadd"], c["other"]) == (7, 2, 1, 1, 1, 1, 1)
    assert c["products"] == 1  # 2 HMMA.16816: one 16x16x16 product
    tf32 = sc.classify(sc.parse(LISTING.replace("HMMA.16816.F32.BF16", "HMMA.1688.F32.TF32"))["_Z1kv"][1:8])
    wmma_tf32 = sc.classify(sc.parse(LISTING.replace("HMMA.16816.F32.BF16", "HMMA.1684.F32.TF32"))["_Z1kv"][1:8])
    assert (tf32["products"], wmma_tf32["products"]) == (1, 0.5)  # a 16x16x8 product: 2 HMMA.1688, 4 HMMA.1684
    assert sorted({i[3] for i in body if i[3] is not None}) == [10, 12]  # mma.hpp's line is not a kernel line
    assert sc.loops(funcs["_Z1jv"]) == []


def test_variants():
    assert sc.variant("void pyseg::meta_forward_mma_kernel<float, 3>(const float*)") == ("float", "kSplit=3", 3)
    assert sc.variant("void pyseg::meta_forward_mma_kernel<float, 1>(const float*)") == ("float", "kSplit=1", 1)
    assert sc.variant("void pyseg::meta_forward_mma_kernel<c10::BFloat16, 1>(x)") == ("BFloat16", "kSplit=1", 1)
    assert sc.variant("void pyseg::pw_forward_mma_kernel<c10::Half, 2>(x)") == ("Half", "MT=2", 1)


def test_all_loops_listing():
    """--all-loops: every loop (HMMA or not) whose first kernel line is in the range, with its nested loops."""
    code = sc.parse(LISTING)["_Z1kv"]
    assert sc.all_loops(code) == [(1, 7), (8, 9)]
    out = sc.loop_listing(code, 1, 20)
    assert out == ["  all-loops @0x10 lines 10-12: 7 instr; LDG 0, LD 0, LDS 1, STS 0",
                   "  all-loops @0x80 lines 12-12: 2 instr; LDG 0, LD 0, LDS 1, STS 0"]  # line 12 carries on
    assert sc.loop_listing(code, 11, 20) == [out[1]]
    # the second loop branching back to the first one's start: it encloses the first
    outer = sc.parse(LISTING.replace("@!P1 BRA `(.L_x_1)", "@!P1 BRA `(.L_x_0)"))["_Z1kv"]
    assert sc.loop_listing(outer, 10, 10)[-1] == ("  all-loops @0x10 lines 10-12: 9 instr; LDG 0, LD 0, LDS 2, STS 0; "
                                                  "contains @0x10")
