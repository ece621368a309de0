"""A tiny x86-64 assembler for vmferry's guest programs.

It takes Intel-syntax source (the subset GNU ``as -msyntax=intel -mnaked-reg`` also reads)
and produces machine code.  Only what the guest programs use is supported, always with
64-bit operands and always in one fixed encoding (jumps are rel32), so the output is
reproducible byte for byte:

================================  ===================================================
``mov r, r`` / ``r, [m]`` / ``[m], r``   ``89 /r``, ``8B /r``
``mov r, imm``                    ``B8+r io`` (movabs, 8-byte immediate)
``mov qword ptr [m], imm``        ``C7 /0 id`` (sign-extended 32-bit immediate)
``add|sub|and|or|xor|cmp|test``   register/register and register/memory forms;
                                  ``add|sub|and|cmp r, imm`` as ``81 /n id``;
                                  ``cmp qword ptr [m], imm`` as ``83 /7 ib``
``imul r, r``                     ``0F AF /r``
``mul r`` / ``neg r`` / ``inc r``  ``F7 /4``, ``F7 /3``, ``FF /0``
``shl|shr r, imm``                ``C1 /4 ib``, ``C1 /5 ib``
``rdtsc``, ``pause``               ``0F 31``, ``F3 90``
``jmp label``, ``jCC label``      ``E9 rel32``, ``0F 8x rel32``
================================  ===================================================

A memory operand is ``[reg]`` or ``[reg+disp]`` / ``[reg-disp]``; ``qword ptr`` may
precede it.  ``label:`` defines a label, ``.equ NAME, value`` a constant usable wherever a
number is, ``;`` or ``#`` starts a comment.  Anything else is an :class:`AsmError` naming
the line.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from vmferry.errors import ConfigError

REGS = {
    name: i
    for i, name in enumerate(
        ["rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"]
    )
}
JCC = {"jo": 0x80, "jno": 0x81, "jb": 0x82, "jae": 0x83, "jz": 0x84, "je": 0x84,
       "jnz": 0x85, "jne": 0x85, "jbe": 0x86, "ja": 0x87, "js": 0x88, "jns": 0x89,
       "jl": 0x8C, "jge": 0x8D, "jle": 0x8E, "jg": 0x8F}
#: (r/m <- reg, reg <- r/m, /digit for imm32) per two-operand ALU instruction
ALU = {"add": (0x01, 0x03, 0), "or": (0x09, 0x0B, 1), "and": (0x21, 0x23, 4),
       "sub": (0x29, 0x2B, 5), "xor": (0x31, 0x33, 6), "cmp": (0x39, 0x3B, 7)}


class AsmError(ConfigError):
    """The assembly source is not in the supported subset."""


@dataclass(frozen=True)
class Mem:
    base: int
    disp: int


@dataclass(frozen=True)
class Program:
    code: bytes
    labels: dict[str, int]


def _rex(w: int, reg: int, rm: int) -> int:
    return 0x40 | (w << 3) | ((reg >> 3) << 2) | (rm >> 3)


def _modrm(reg: int, operand: int | Mem) -> tuple[int, bytes]:
    """(REX, ModRM [SIB] [disp]) for register field ``reg`` and r/m ``operand``."""
    if isinstance(operand, int):
        return _rex(1, reg, operand), bytes([0xC0 | ((reg & 7) << 3) | (operand & 7)])
    base, disp = operand.base, operand.disp
    if disp == 0 and base & 7 != 5:
        mod, tail = 0, b""
    elif -128 <= disp <= 127:
        mod, tail = 1, struct.pack("<b", disp)
    else:
        mod, tail = 2, struct.pack("<i", disp)
    sib = b"\x24" if base & 7 == 4 else b""
    return _rex(1, reg, base), bytes([(mod << 6) | ((reg & 7) << 3) | (base & 7)]) + sib + tail


def _emit(opcode: bytes, reg: int, operand: int | Mem, imm: bytes = b"") -> bytes:
    rex, modrm = _modrm(reg, operand)
    return bytes([rex]) + opcode + modrm + imm


_MEM = re.compile(r"^(?:qword\s+ptr\s+)?\[\s*(\w+)\s*(?:([+-])\s*(\w+)\s*)?\]$")


class _Assembler:
    def __init__(self) -> None:
        self.consts: dict[str, int] = {}

    def number(self, text: str, line: int) -> int:
        text = text.strip()
        if text in self.consts:
            return self.consts[text]
        try:
            return int(text, 0)
        except ValueError:
            raise AsmError(f"line {line}: {text!r} is not a number or constant") from None

    def operand(self, text: str, line: int) -> int | Mem | tuple[str, int]:
        text = text.strip().lower()
        if text in REGS:
            return REGS[text]
        m = _MEM.match(text)
        if m:
            if m.group(1) not in REGS:
                raise AsmError(f"line {line}: base {m.group(1)!r} is not a 64-bit register")
            disp = self.number(m.group(3), line) if m.group(3) else 0
            if m.group(2) == "-":
                disp = -disp
            if not -(2**31) <= disp < 2**31:
                raise AsmError(f"line {line}: displacement {disp} does not fit 32 bits")
            return Mem(REGS[m.group(1)], disp)
        if text.startswith("qword ptr"):
            raise AsmError(f"line {line}: bad memory operand {text!r}")
        return ("imm", self.number(text, line))


def assemble(source: str, origin: int = 0) -> Program:
    """Assemble ``source`` for loading at guest address ``origin``."""
    asm = _Assembler()
    code = bytearray()
    labels: dict[str, int] = {}
    fixups: list[tuple[int, str, int]] = []  # (offset of rel32, label, line)
    for lineno, raw in enumerate(source.splitlines(), 1):
        text = re.split(r"[;#]", raw, maxsplit=1)[0].strip()
        if not text:
            continue
        if text.endswith(":"):
            name = text[:-1].strip()
            if not re.fullmatch(r"[A-Za-z_.][\w.]*", name) or name in labels:
                raise AsmError(f"line {lineno}: bad or repeated label {name!r}")
            labels[name] = len(code)
            continue
        mnemonic, _, rest = text.partition(" ")
        mnemonic = mnemonic.lower()
        args = [a for a in (p.strip() for p in rest.split(",")) if a] if rest.strip() else []
        if mnemonic == ".equ":
            if len(args) != 2:
                raise AsmError(f"line {lineno}: .equ NAME, value")
            asm.consts[args[0].lower()] = asm.number(args[1], lineno)
            continue
        if mnemonic == "jmp" or mnemonic in JCC:
            if len(args) != 1:
                raise AsmError(f"line {lineno}: {mnemonic} takes one label")
            code += b"\xe9" if mnemonic == "jmp" else bytes([0x0F, JCC[mnemonic]])
            fixups.append((len(code), args[0], lineno))
            code += b"\0\0\0\0"
            continue
        ops = [asm.operand(a, lineno) for a in args]
        code += _encode(mnemonic, ops, lineno)
    for at, label, lineno in fixups:
        if label not in labels:
            raise AsmError(f"line {lineno}: undefined label {label!r}")
        code[at : at + 4] = struct.pack("<i", labels[label] - (at + 4))
    return Program(bytes(code), {k: origin + v for k, v in labels.items()})


def _imm(op: object) -> int | None:
    return op[1] if isinstance(op, tuple) else None


def _encode(mn: str, ops: list[int | Mem | tuple[str, int]], line: int) -> bytes:
    def bad() -> AsmError:
        return AsmError(f"line {line}: unsupported form of {mn} {ops}")

    if mn == "rdtsc" and not ops:
        return b"\x0f\x31"
    if mn == "pause" and not ops:
        return b"\xf3\x90"
    if len(ops) == 1 and isinstance(ops[0], int):
        r = ops[0]
        table = {"mul": (b"\xf7", 4), "neg": (b"\xf7", 3), "inc": (b"\xff", 0),
                 "dec": (b"\xff", 1)}
        if mn in table:
            opcode, digit = table[mn]
            return _emit(opcode, digit, r)
        raise bad()
    if len(ops) != 2:
        raise bad()
    dst, src = ops
    imm = _imm(src)
    if mn == "mov":
        if isinstance(dst, int) and isinstance(src, int | Mem):
            return _emit(b"\x8b", dst, src) if isinstance(src, Mem) else _emit(b"\x89", src, dst)
        if isinstance(dst, Mem) and isinstance(src, int):
            return _emit(b"\x89", src, dst)
        if isinstance(dst, int) and imm is not None:
            if not -(2**63) <= imm < 2**64:
                raise AsmError(f"line {line}: immediate {imm} does not fit 64 bits")
            return bytes([_rex(1, 0, dst), 0xB8 + (dst & 7)]) + struct.pack("<Q", imm % 2**64)
        if isinstance(dst, Mem) and imm is not None:
            return _emit(b"\xc7", 0, dst, _imm32(imm, line))
        raise bad()
    if mn in ALU:
        to_rm, to_reg, digit = ALU[mn]
        if isinstance(dst, int | Mem) and isinstance(src, int):
            return _emit(bytes([to_rm]), src, dst)
        if isinstance(dst, int) and isinstance(src, Mem):
            return _emit(bytes([to_reg]), dst, src)
        if imm is not None and mn == "cmp" and isinstance(dst, Mem):
            if not -128 <= imm <= 127:
                raise AsmError(f"line {line}: cmp with memory takes an 8-bit immediate")
            return _emit(b"\x83", 7, dst, struct.pack("<b", imm))
        if imm is not None and isinstance(dst, int):
            return _emit(b"\x81", digit, dst, _imm32(imm, line))
        raise bad()
    if mn == "test" and isinstance(dst, int | Mem) and isinstance(src, int):
        return _emit(b"\x85", src, dst)
    if mn == "imul" and isinstance(dst, int) and isinstance(src, int | Mem):
        return _emit(b"\x0f\xaf", dst, src)
    if mn in ("shl", "shr") and isinstance(dst, int) and imm is not None:
        if not 0 <= imm < 64:
            raise AsmError(f"line {line}: shift count {imm} not in [0, 64)")
        return _emit(b"\xc1", 4 if mn == "shl" else 5, dst, bytes([imm]))
    raise bad()


def _imm32(value: int, line: int) -> bytes:
    if not -(2**31) <= value < 2**31:
        raise AsmError(f"line {line}: immediate {value} does not fit a signed 32-bit field")
    return struct.pack("<i", value)
