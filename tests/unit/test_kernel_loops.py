"""benchmarks.kernel_loops: innermost loops that keep vector registers on the stack."""

import shutil

import pytest

from benchmarks import kernel_loops
from labram_jax.models import cpu_kernels

# objdump -d --no-show-raw-insn -C style: `spilled` stores two accumulators per step of its inner loop
# (the pattern session 40 found in WideProductTN), `clean` keeps them in registers; each has an outer
# loop around the inner one.
DISASSEMBLY = """
0000000000001000 <spilled(float const*)>:
    1000:	vxorps %xmm0,%xmm0,%xmm0
    1004:	vmovups (%rdx),%zmm1
    1010:	vbroadcastss (%rax),%zmm2
    1016:	vfmadd231ps %zmm1,%zmm2,%zmm3
    101c:	vmovaps %zmm3,0x108(%rsp)
    1024:	vfmadd231ps %zmm1,%zmm2,%zmm4
    102a:	vmovaps %zmm4,-0x48(%rbp)
    1030:	vaddps 0x40(%rsp),%zmm5,%zmm5
    1036:	cmp    %rsi,%rdx
    1039:	jne    1010 <spilled(float const*)+0x10>
    103f:	add    $0x1,%ecx
    1042:	jne    1004 <spilled(float const*)+0x4>
    1048:	ret

0000000000002000 <clean(float const*)>:
    2000:	vmovups (%rdx),%zmm1
    2006:	vbroadcastss (%rax),%zmm2
    200c:	vfmadd231ps %zmm1,%zmm2,%zmm3
    2012:	vfmadd231ps %zmm1,%zmm2,%zmm4
    2018:	cmp    %rsi,%rdx
    201b:	jne    2000 <clean(float const*)>
    2021:	vmovaps %zmm3,0x40(%rsp)
    2029:	mov    %rax,0x8(%rsp)
    202e:	dec    %ecx
    2030:	jne    2021 <clean(float const*)+0x21>
    2036:	ret
"""


def test_innermost_loops_count_the_vector_registers_kept_on_the_stack():
    loops = {loop.function: loop for loop in kernel_loops.vector_loops(DISASSEMBLY)}
    spilled, clean = loops["spilled(float const*)"], loops["clean(float const*)"]
    # The inner loop only (the outer one at 0x1004 holds it), its two FMAs, two stores, one read.
    assert (spilled.start, spilled.instructions, spilled.fmas, spilled.arithmetic) == (0x1010, 8, 2, 3)
    assert (spilled.stores, spilled.loads) == (2, 1)
    assert (clean.start, clean.fmas, clean.stores, clean.loads) == (0x2000, 2, 0, 0)
    # The epilogue loop at 0x2021 stores a vector but does no arithmetic: not a vector loop.
    assert len(kernel_loops.vector_loops(DISASSEMBLY)) == 2
    assert [loop.function for loop in kernel_loops.vector_loops(DISASSEMBLY, ["clean"])] == ["clean(float const*)"]


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) not installed")
@pytest.mark.skipif(cpu_kernels.unavailable_reason() is not None,
                    reason=f"CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")
def test_the_kernels_register_tiles_keep_their_accumulators_in_registers():
    # The products' tiles: every innermost loop doing FMAs stores no vector to the stack (before session
    # 40, WideProductTN stored its 20 accumulators at each step and WideProductNN a row of b).
    # Each tile is looked for in its function or in the one it calls for its sums, whichever the compiler
    # kept the loop in (the product kernel's Tile<2> calls Sums<2> since its loop takes 4 steps a trip).
    path = cpu_kernels.build(cpu_kernels.compiler())
    tiles = [("WideProductTN",), ("WideProductNN<3>",), ("WideTile<2>", "WideSums<2>"), ("WideTileNT<2, false>",),
             ("Tile<2>", "Sums<2>"), ("ProductTN",)]
    loops = kernel_loops.vector_loops(kernel_loops.disassemble(path), [n for names in tiles for n in names])
    for names in tiles:
        found = [loop for loop in loops if any(f"::{n}(" in loop.function for n in names) and loop.fmas >= 12]
        assert found, f"no innermost loop of 12 or more FMAs in {' or '.join(names)}"
        assert all(loop.stores == 0 for loop in found), [loop for loop in found if loop.stores]
