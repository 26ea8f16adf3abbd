"""A tiny in-memory library that answers to BLAS names and forwards each call to a prefixed twin.

The ``scipy-openblas32`` wheel ships an OpenBLAS built for every x86-64 CPU (``DYNAMIC_ARCH``)
and with no Fortran runtime to find, but it exports its functions as ``scipy_cblas_sgemm`` and
so on, names MLX does not ask for. :func:`alias_library` writes a minimal ELF shared library
(x86-64 only: where it was measured) whose exported ``cblas_sgemm`` etc. are one-instruction
jumps through a table of pointers; the caller loads it with ``RTLD_GLOBAL`` before ``mlx.core``
and fills the table with the real functions' addresses. No relocations, no compiler, no file.

:func:`undefined_symbols` reads which names a library (``libmlx.so``) needs from elsewhere, so
the alias covers exactly the BLAS/LAPACK calls that MLX makes.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

SLOTS_SYMBOL = "mlx_reasoner_alias_slots"

_PAGE = 0x1000
_EHDR_SIZE, _PHDR_SIZE, _SYM_SIZE, _STUB_SIZE = 64, 56, 24, 16
_EM_X86_64 = 62
_PT_LOAD, _PT_DYNAMIC, _PT_GNU_STACK = 1, 2, 0x6474E551
_PF_X, _PF_W, _PF_R = 1, 2, 4
_DT_NULL, _DT_HASH, _DT_STRTAB, _DT_SYMTAB, _DT_STRSZ, _DT_SYMENT, _DT_SONAME = (
    0,
    4,
    5,
    6,
    10,
    11,
    14,
)
_STT_OBJECT, _STT_FUNC, _STB_GLOBAL = 1, 2, 1
_SHT_DYNSYM, _SHN_UNDEF = 11, 0
_ENDBR64 = b"\xf3\x0f\x1e\xfa"  # a no-op unless the CPU enforces indirect-branch tracking


def _align(value: int, to: int) -> int:
    return (value + to - 1) // to * to


def elf_hash(name: bytes) -> int:
    """The System V ELF symbol hash (the ``DT_HASH`` table's function).

    >>> hex(elf_hash(b"cblas_sgemm"))
    '0x9004abd'
    """
    value = 0
    for byte in name:
        value = ((value << 4) + byte) & 0xFFFFFFFF
        high = value & 0xF0000000
        if high:
            value ^= high >> 24
        value &= ~high & 0xFFFFFFFF
    return value


def alias_library(names: list[str], soname: str = "libmlx_reasoner_blas_alias.so") -> bytes:
    """An x86-64 ELF shared library exporting ``names`` as jumps through a pointer table.

    Entry ``i`` of the exported object :data:`SLOTS_SYMBOL` (``len(names)`` pointers, zero when
    loaded) is where ``names[i]`` jumps; fill it before anything calls the functions.

    Args:
        names: Function names to export (distinct, non-empty).
        soname: The library's soname.

    Returns:
        The library's bytes, ready to ``dlopen`` from a memfd or a file.
    """
    if not names or len(set(names)) != len(names) or not all(names):
        raise ValueError("alias names must be distinct and non-empty")
    symbols = [*names, SLOTS_SYMBOL]
    strings = bytearray(b"\0")
    name_offsets = []
    for name in [*symbols, soname]:
        name_offsets.append(len(strings))
        strings += name.encode() + b"\0"
    count = len(symbols) + 1  # with the null symbol at index 0
    buckets = max(1, count // 2)

    # Read-only + executable segment: headers, hash, symbols, strings, stubs.
    phdr_count = 4
    hash_at = _EHDR_SIZE + phdr_count * _PHDR_SIZE
    symtab_at = _align(hash_at + 4 * (2 + buckets + count), 8)
    strtab_at = symtab_at + _SYM_SIZE * count
    text_at = _align(strtab_at + len(strings), _STUB_SIZE)
    text_end = text_at + _STUB_SIZE * len(names)
    # Read-write segment on its own page: the dynamic section, then the pointer table.
    data_at = _align(text_end, _PAGE)
    dynamic = [
        (_DT_HASH, hash_at),
        (_DT_STRTAB, strtab_at),
        (_DT_SYMTAB, symtab_at),
        (_DT_STRSZ, len(strings)),
        (_DT_SYMENT, _SYM_SIZE),
        (_DT_SONAME, name_offsets[-1]),
        (_DT_NULL, 0),
    ]
    slots_at = data_at + 16 * len(dynamic)
    data_end = slots_at + 8 * len(names)

    image = bytearray(data_end)
    struct.pack_into(
        "<4sBBBBB7xHHIQQQIHHHHHH",
        image,
        0,
        b"\x7fELF",
        2,  # 64-bit
        1,  # little-endian
        1,  # ELF version
        0,  # System V ABI
        0,
        3,  # ET_DYN
        _EM_X86_64,
        1,
        0,  # no entry point
        _EHDR_SIZE,  # program headers right after this header
        0,  # no section headers
        0,
        _EHDR_SIZE,
        _PHDR_SIZE,
        phdr_count,
        64,
        0,
        0,
    )
    segments = [
        (_PT_LOAD, _PF_R | _PF_X, 0, text_end, _PAGE),
        (_PT_LOAD, _PF_R | _PF_W, data_at, data_end - data_at, _PAGE),
        (_PT_DYNAMIC, _PF_R | _PF_W, data_at, 16 * len(dynamic), 8),
        (_PT_GNU_STACK, _PF_R | _PF_W, 0, 0, 16),  # no executable stack
    ]
    for index, (kind, flags, offset, size, align) in enumerate(segments):
        struct.pack_into(
            "<IIQQQQQQ",
            image,
            _EHDR_SIZE + index * _PHDR_SIZE,
            kind,
            flags,
            offset,
            offset,  # virtual address = file offset
            offset,
            size,
            size,
            align,
        )

    chains = [0] * count
    heads = [0] * buckets
    for index, name in enumerate(symbols, start=1):
        bucket = elf_hash(name.encode()) % buckets
        chains[index], heads[bucket] = heads[bucket], index
    struct.pack_into(f"<{2 + buckets + count}I", image, hash_at, buckets, count, *heads, *chains)

    for index, name in enumerate(symbols):
        if name == SLOTS_SYMBOL:
            info, value, size = (_STB_GLOBAL << 4) | _STT_OBJECT, slots_at, 8 * len(names)
        else:
            info, value, size = (_STB_GLOBAL << 4) | _STT_FUNC, text_at + index * _STUB_SIZE, 16
        # Any section index but SHN_UNDEF/SHN_ABS marks a symbol defined relative to the base.
        struct.pack_into(
            "<IBBHQQ", image, symtab_at + (index + 1) * _SYM_SIZE, name_offsets[index], info, 0,
            1, value, size,
        )  # fmt: skip
    image[strtab_at : strtab_at + len(strings)] = strings

    for index in range(len(names)):
        stub = text_at + index * _STUB_SIZE
        jump_end = stub + len(_ENDBR64) + 6
        displacement = slots_at + 8 * index - jump_end  # jmp *[rip + displacement]
        code = _ENDBR64 + b"\xff\x25" + struct.pack("<i", displacement)
        image[stub : stub + _STUB_SIZE] = code.ljust(_STUB_SIZE, b"\xcc")  # int3 padding
    for index, (tag, value) in enumerate(dynamic):
        struct.pack_into("<qQ", image, data_at + 16 * index, tag, value)
    return bytes(image)


def undefined_symbols(path: str | Path) -> list[str]:
    """The names a 64-bit little-endian ELF library leaves for other libraries to define.

    Read from its ``.dynsym`` section (found through the section headers), without loading it.
    """
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
            raise ValueError(f"{path} is not a 64-bit little-endian ELF file")
        (shoff,) = struct.unpack_from("<Q", data, 0x28)
        entry_size, count = struct.unpack_from("<HH", data, 0x3A)
        sections = [
            struct.unpack_from("<IIQQQQIIQQ", data, shoff + index * entry_size)
            for index in range(count)
        ]
        for _, kind, _, _, offset, size, link, _, _, sym_size in sections:
            if kind != _SHT_DYNSYM:
                continue
            strings_at = sections[link][4]
            names = []
            for position in range(offset + sym_size, offset + size, sym_size):
                name_at, _, _, section = struct.unpack_from("<IBBH", data, position)
                if section == _SHN_UNDEF and name_at:
                    end = data.find(b"\0", strings_at + name_at)
                    names.append(data[strings_at + name_at : end].decode())
            return names
    raise ValueError(f"{path} has no dynamic symbol table")
