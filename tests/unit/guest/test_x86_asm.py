"""Issue 11 item 2: the guest program's assembler, checked against known encodings and,
where GNU binutils is installed, against objdump's reading of every instruction."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmferry.guest.x86 import program as prog
from vmferry.guest.x86.asm import REGS, AsmError, assemble

KNOWN = {
    "mov rax, qword ptr [r15+8]": "498b4708",
    "mov rcx, qword ptr [r15]": "498b0f",
    "mov qword ptr [r14], r13": "4d892e",
    "mov qword ptr [r12], rax": "49890424",  # r12 base needs a SIB byte
    "mov qword ptr [r13], rax": "49894500",  # r13 base needs a displacement
    "mov qword ptr [rbx], 0": "48c70300000000",
    "mov rax, 0x1122334455667788": "48b88877665544332211",
    "imul r11, rax": "4c0fafd8",
    "mul rcx": "48f7e1",
    "neg rdx": "48f7da",
    "inc r13": "49ffc5",
    "shl rdx, 32": "48c1e220",
    "shr rax, 24": "48c1e818",
    "and rax, 255": "4881e0ff000000",
    "cmp qword ptr [r15+40], 0": "49837f2800",
    "cmp rdx, qword ptr [r15+48]": "493b5730",
    "xor r9, r9": "4d31c9",
    "rdtsc": "0f31",
    "mov rax, qword ptr [rsp+0x1000]": "488b842400100000",
}


@pytest.mark.parametrize(("line", "hexbytes"), sorted(KNOWN.items()))
def test_item2_known_encodings(line: str, hexbytes: str) -> None:
    assert assemble(line).code.hex() == hexbytes


def test_item2_jumps_and_labels() -> None:
    p = assemble("top:\n  jmp end\n  jz top\nend:\n  rdtsc\n", origin=0x1000)
    assert p.code.hex() == "e906000000" + "0f84f5ffffff" + "0f31"
    assert p.labels == {"top": 0x1000, "end": 0x100B}


@pytest.mark.parametrize("bad", ["mov eax, 1", "jmp nowhere", "push rax", "shl rax, 64",
                                 "mov qword ptr [rax], 0x100000000", "x:\nx:", "add rax"])
def test_item2_unsupported_source_is_a_clear_error(bad: str) -> None:
    with pytest.raises(AsmError, match="line"):
        assemble(bad)


def test_item2_program_is_reproducible_and_fits_below_data() -> None:
    code = prog.workload_program().code
    src = (Path(prog.__file__).parent / "workload.s").read_text()
    assert assemble(src, prog.CODE).code == code
    assert prog.CODE + len(code) < prog.DATA


@given(st.sampled_from(sorted(REGS)), st.sampled_from(sorted(REGS)),
       st.integers(-(2**31), 2**31 - 1))
def test_item2_memory_operands_decode_back(dst: str, base: str, disp: int) -> None:
    """Every register/base/displacement combination round-trips through objdump."""
    if shutil.which("objdump") is None:
        pytest.skip("GNU objdump is not installed")
    line = f"mov {dst}, qword ptr [{base}{disp:+d}]"
    assert _objdump(assemble(line).code) == [_norm(line)]


def _norm(line: str) -> str:
    line = line.lower().replace("qword ptr ", "")

    def hexify(m: re.Match[str]) -> str:
        v = int(m.group(2))
        return f"{m.group(1)}{'-' if v < 0 else '+'}{abs(v):#x}" if v else m.group(1)

    line = re.sub(r"(\[\w+)([+-]\d+)", hexify, line)
    return re.sub(r"\s+", " ", line.replace(", ", ","))


def _objdump(code: bytes) -> list[str]:
    import os
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".bin", delete=False) as f:
        f.write(code)
    try:
        out = subprocess.run(["objdump", "-D", "-b", "binary", "-m", "i386:x86-64",
                              "-M", "intel", f.name], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.unlink(f.name)
    lines = []
    for row in out.splitlines():
        parts = row.split("\t")
        if len(parts) >= 3 and re.match(r"\s*[0-9a-f]+:", parts[0]):
            text = parts[2].lower().replace("qword ptr ", "").replace("+0x0]", "]")
            lines.append(re.sub(r"\s+", " ", text.replace(", ", ",")).strip())
    return lines


def test_item2_whole_program_disassembles_to_its_source() -> None:
    if shutil.which("objdump") is None:
        pytest.skip("GNU objdump is not installed")
    listing = _objdump(prog.workload_program().code)
    mnemonics = [row.split(" ")[0] for row in listing]
    src = (Path(prog.__file__).parent / "workload.s").read_text()
    expected = []
    for raw in src.splitlines():
        text = raw.split(";")[0].strip()
        if text and not text.endswith(":") and not text.startswith(".equ"):
            expected.append(text.split()[0])
    aliases = {"jz": "je", "jnz": "jne", "mov": "mov"}
    assert [m if m != "movabs" else "mov" for m in mnemonics] == [
        aliases.get(m, m) for m in expected]
