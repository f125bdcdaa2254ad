"""List the GPU code embedded in a shared library or object: `python .ci/fatbin_archs.py FILE`.

Prints e.g. "sm_75 sm_80 sm_86 sm_89 sm_90 compute_90" (cubins as sm_XX, PTX as compute_XX), read
from the ELF section .nv_fatbin, for machines without cuobjdump. Fat binary layout (as cuobjdump
and nvcc's fatbinary write it): containers of a 16-byte header (magic 0xBA55ED50, u16 version,
u16 header size, u64 payload size), each holding entries whose header starts u16 kind (1 PTX,
2 ELF), u16, u32 header size, u64 payload size, … and the architecture as u32 at offset 28.
"""

from __future__ import annotations

import struct
import sys

FATBIN_MAGIC = 0xBA55ED50


def nv_fatbin(data: bytes) -> bytes:
    """The .nv_fatbin section of a 64-bit little-endian ELF file (b"" if it has none)."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ValueError("not a 64-bit ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_off = sections[shstrndx][4]
    for name, _type, _flags, _addr, offset, size in sections:
        end = data.index(b"\0", names_off + name)
        if data[names_off + name:end] == b".nv_fatbin":
            return data[offset:offset + size]
    return b""


def archs(fatbin: bytes) -> list[str]:
    out, pos = [], 0
    while pos + 16 <= len(fatbin):
        magic, _version, header, size = struct.unpack_from("<IHHQ", fatbin, pos)
        if magic != FATBIN_MAGIC:  # containers are 8-byte aligned; skip padding
            pos += 8
            continue
        entry, end = pos + header, pos + header + size
        while entry + 32 <= end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", fatbin, entry)
            arch, = struct.unpack_from("<I", fatbin, entry + 28)
            name = {1: "compute", 2: "sm"}.get(kind)
            if name and f"{name}_{arch}" not in out:
                out.append(f"{name}_{arch}")
            if entry_header == 0:
                break
            entry += entry_header + payload
        pos = end
    return sorted(out, key=lambda a: (a.startswith("compute"), int(a.split("_")[1])))


if __name__ == "__main__":
    with open(sys.argv[1], "rb") as f:
        print(" ".join(archs(nv_fatbin(f.read()))))
