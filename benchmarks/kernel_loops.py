"""Diagnostic: the C++ CPU kernels' innermost loops that keep vector values on the stack.

    python -m benchmarks.kernel_loops [--all] [--match NAME ...] [--json OUT.json]

Disassembles the kernels' library as built here (``objdump -d``; the build of
``labram_jax.models.cpu_kernels``, this compiler and these flags) and lists every innermost loop
(a backward jump whose body holds no other) that does vector arithmetic and stores a vector register
to the stack or reads one back. A register tile whose accumulators the compiler could not keep in
registers shows up here as one store per accumulator and step: session 40 found the attention's
WideProductTN storing its 20 accumulators at every step of its loop (20 stores for 20 FMAs), and
WideProductNN keeping a row of b on the stack (AVX2 vectors in an ``avx512f`` function reach only
ymm0-15); fixed, the tokenizer's step took 0.94x and 0.97x the time. Constants read from the stack
(a polynomial's coefficients) are harmless: ``stores`` is the column to read first.

``--all`` lists every innermost vector loop; ``--match`` keeps the functions whose name contains one
of the strings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import subprocess

from labram_jax.models import cpu_kernels

_FUNCTION = re.compile(r"^([0-9a-f]+) <(.*)>:$")
_INSTRUCTION = re.compile(r"^\s*([0-9a-f]+):\s+(.*)$")
_JUMP = re.compile(r"^j\w+\s+([0-9a-f]+)\b")
_VECTOR = re.compile(r"%[xyz]mm\d+")
_STACK = r"-?(?:0x[0-9a-f]+)?\(%r[sb]p(?:,[^)]*)?\)"
_STACK_STORE = re.compile(r"^v?mov\w*\s+%[xyz]mm\d+(?:\{[^}]*\})*," + _STACK + "$")
_STACK_LOAD = re.compile(_STACK + r".*,%[xyzk]\w*\d*(?:\{[^}]*\})*$")
_ARITHMETIC = re.compile(r"^v(?:fn?m(?:add|sub)|add|sub|mul|div|max|min|sqrt)\w*\s")


@dataclasses.dataclass(frozen=True)
class Loop:
    """One innermost loop: its function, first address, instruction count, and how many of its
    instructions are vector arithmetic (FMAs counted apart), vector stores to the stack, and reads
    from the stack into a register."""
    function: str
    start: int
    instructions: int
    arithmetic: int
    fmas: int
    stores: int
    loads: int


def parse(disassembly: str) -> dict[str, list[tuple[int, str]]]:
    """``objdump -d --no-show-raw-insn`` text -> {function: [(address, instruction), ...]}."""
    functions: dict[str, list[tuple[int, str]]] = {}
    current = None
    for line in disassembly.splitlines():
        found = _FUNCTION.match(line)
        if found:
            current = functions.setdefault(found.group(2), [])
            continue
        found = _INSTRUCTION.match(line)
        if found and current is not None:
            current.append((int(found.group(1), 16), found.group(2).strip()))
    return functions


def innermost_loops(function: str, instructions: list[tuple[int, str]]) -> list[Loop]:
    """The function's innermost loops: each backward jump within the function spans [target, jump];
    a span holding another span is not innermost."""
    if not instructions:
        return []
    first = instructions[0][0]
    spans = []
    for address, text in instructions:
        jump = _JUMP.match(text)
        if jump and first <= int(jump.group(1), 16) < address:
            spans.append((int(jump.group(1), 16), address))
    loops = []
    for start, end in set(spans):
        if any((s, e) != (start, end) and start <= s and e <= end for s, e in spans):
            continue
        body = [text for address, text in instructions if start <= address <= end]
        arithmetic = sum(bool(_ARITHMETIC.match(t) and _VECTOR.search(t)) for t in body)
        loops.append(Loop(function, start, len(body), arithmetic, sum(t.startswith("vfm") for t in body),
                          sum(bool(_STACK_STORE.match(t)) for t in body),
                          sum(bool(_STACK_LOAD.search(t)) for t in body)))
    return sorted(loops, key=lambda loop: loop.start)


def vector_loops(disassembly: str, match: list[str] | None = None) -> list[Loop]:
    """Every innermost loop doing vector arithmetic, in the functions whose names contain one of
    ``match`` (all without it)."""
    out = []
    for function, instructions in parse(disassembly).items():
        if match and not any(m in function for m in match):
            continue
        out += [loop for loop in innermost_loops(function, instructions) if loop.arithmetic]
    return out


def disassemble(path: str) -> str:
    objdump = shutil.which("objdump")
    if objdump is None:
        raise SystemExit("objdump not found: install binutils (Debian/Ubuntu: apt install binutils)")
    return subprocess.run([objdump, "-d", "--no-show-raw-insn", "-C", path], capture_output=True, text=True,
                          check=True).stdout


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every innermost vector loop, not only those "
                        "with vector registers on the stack")
    parser.add_argument("--match", nargs="+", help="only functions whose name contains one of these")
    parser.add_argument("--json", help="write the loops here")
    args = parser.parse_args(argv)
    compiler = cpu_kernels.compiler()
    if compiler is None:
        raise SystemExit("no C++ compiler: the kernels cannot be built here (set CXX, or install g++)")
    path = cpu_kernels.build(compiler)
    loops = vector_loops(disassemble(path), args.match)
    if not args.all:
        loops = [loop for loop in loops if loop.stores or loop.loads]
    loops.sort(key=lambda loop: (-loop.stores, -loop.loads, loop.function))
    print(f"library: {path}")
    print(f"{'stores':>6} {'loads':>5} {'FMAs':>4} {'vector':>6} {'length':>6}  function (innermost loop at)")
    for loop in loops:
        print(f"{loop.stores:6d} {loop.loads:5d} {loop.fmas:4d} {loop.arithmetic:6d} {loop.instructions:6d}  "
              f"{loop.function[:100]} (0x{loop.start:x})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"library": path, "loops": [dataclasses.asdict(loop) for loop in loops]}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
