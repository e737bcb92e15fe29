#!/usr/bin/env python3
"""Mark an ELF64 binary's version requirements on the named libraries weak (VER_FLG_WEAK).

`scripts/gpu-check.sh build` retargets CUDA 11.8 library references (libcublas.so.11, ...) to the
GPU machine's major version with patchelf; patchelf clears the symbols' versions but leaves the
`.gnu.version_r` entries (e.g. "libcublas.so.11"), which the loader would then demand from
libcublas.so.13. A weak requirement that is missing is not fatal (glibc).

usage: elf-weak-verneed.py BINARY PREFIX...   (e.g. libcublas libnvrtc)
"""
import struct
import sys


def main(path, prefixes):
    data = bytearray(open(path, "rb").read())
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        sys.exit(f"{path}: not a little-endian ELF64 file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    changed = 0
    for (_, sh_type, _, _, off, _, link, info, _, _) in sections:
        if sh_type != 0x6FFFFFFE:  # SHT_GNU_verneed
            continue
        stroff = sections[link][4]

        def name(o):
            end = data.index(b"\0", stroff + o)
            return data[stroff + o:end].decode()

        vn = off
        for _ in range(info):
            _, cnt, file_, aux, nxt = struct.unpack_from("<HHIII", data, vn)
            lib = name(file_)
            a = vn + aux
            for _ in range(cnt):
                _, flags, _, vname, anext = struct.unpack_from("<IHHII", data, a)
                if any(lib.startswith(p) or name(vname).startswith(p) for p in prefixes) and not flags & 2:
                    struct.pack_into("<H", data, a + 4, flags | 2)
                    changed += 1
                    print(f"{path}: version {name(vname)} of {lib} now weak")
                a += anext
            if nxt == 0:
                break
            vn += nxt
    open(path, "wb").write(data)
    return changed


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
