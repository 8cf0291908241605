"""images.json.gz without compressing 20 MB again for every new version.

The document is cut into chunks at content-defined points (a version's line, when a hash of
its first bytes picks it: about one in CUT_EVERY), so a new or removed version changes only
the chunk around it. Each chunk is compressed on its own into raw deflate blocks ending on a
byte boundary (a full flush, so no chunk refers back into another); chunks already compressed
for the previous document are reused. The gzip member is those blocks, a final empty block,
and the CRC-32 and length of the whole document: any gzip reader gives back exactly the
document's bytes.

The document comes as `Pieces`: its bytes in order, never joined (encode.py hands each
version's kept entry by reference), with where its version lines start; a chunk's pieces are
joined only when it is compressed anew, so a publish holds no copy of the whole document.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

#: gzip's default level: at 20,000 versions level 9 takes three times as long for 0.3 % less
LEVEL = 6
#: a chunk ends before a version's line when that line's hash is 0 modulo this
CUT_EVERY = 128
#: bytes from a version's line on that pick the cut (a serial alone repeats across products)
_WINDOW = 256
#: a version's line in images.json: a key four levels down (its serial)
VERSION_LINE = re.compile(rb'\n    "[^"\n]*": \{')
#: gzip header: magic, deflate, no flags, no mtime, no extra flags, OS unknown
_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"

Buffer = bytes | memoryview
#: a place in Pieces: (index of a piece, offset in it)
Place = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Pieces:
    """A document as its bytes in order (`parts`, never empty) and the places where its version
    lines start (`lines`, ascending: each line's leading line break, as VERSION_LINE finds them
    in the joined bytes)."""

    parts: Sequence[Buffer]
    lines: Sequence[Place]

    @classmethod
    def of(cls, data: Buffer) -> Pieces:
        """A document given whole: its version lines found by VERSION_LINE."""
        return cls([data], [(0, m.start()) for m in VERSION_LINE.finditer(data)])

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def join(self) -> bytes:
        return b"".join(self.parts)


def _deflate(chunk: Buffer) -> bytes:
    c = zlib.compressobj(LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)


_FINAL = zlib.compressobj(LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS).flush()


def _window(parts: Sequence[Buffer], at: Place) -> bytes:
    """The _WINDOW bytes from `at` on (fewer at the end), across pieces."""
    index, offset = at
    first = parts[index][offset : offset + _WINDOW]
    if len(first) == _WINDOW or index + 1 == len(parts):
        return bytes(first)
    out = bytearray(first)
    while len(out) < _WINDOW and index + 1 < len(parts):
        index += 1
        out += parts[index][: _WINDOW - len(out)]
    return bytes(out)


def _picked(window: bytes) -> bool:
    return int.from_bytes(hashlib.blake2s(window, digest_size=4).digest()) % CUT_EVERY == 0


def chunks(doc: Pieces) -> Iterator[list[Buffer]]:
    """The document cut before the version lines picked by their checksum: each chunk as its
    pieces (views of the pieces cut)."""
    parts = doc.parts
    # the version's line and what follows (its items' paths): unique to the version
    cuts = [at for at in doc.lines if _picked(_window(parts, at))]
    for (i, start), (end_i, end) in itertools.pairwise([(0, 0), *cuts, (len(parts), 0)]):
        if i == end_i:
            chunk: list[Buffer] = [memoryview(parts[i])[start:end]]
        else:
            chunk = [memoryview(parts[i])[start:] if start else parts[i], *parts[i + 1 : end_i]]
            if end:
                chunk.append(memoryview(parts[end_i])[:end])
        if any(chunk):
            yield chunk


class GzipCache:
    """Compresses documents, reusing the compressed chunks of the previous one."""

    def __init__(self) -> None:
        self._previous: dict[bytes, bytes] = {}

    def compress(self, data: Buffer | Pieces) -> bytes:
        return b"".join(self.compress_parts(data))

    def compress_parts(self, data: Buffer | Pieces) -> list[bytes]:
        """The gzip file of `data`, in pieces (for fsutil.write_atomic: never joined)."""
        doc = data if isinstance(data, Pieces) else Pieces.of(data)
        kept: dict[bytes, bytes] = {}
        out = [_HEADER]
        crc = size = 0
        for chunk in chunks(doc):
            # (a chunk joined is about CUT_EVERY versions' entries: 128 KB, dropped at once)
            data = chunk[0] if len(chunk) == 1 else b"".join(chunk)
            crc = zlib.crc32(data, crc)
            size += len(data)
            key = hashlib.sha256(data).digest()
            deflated = kept.get(key) or self._previous.get(key)
            if deflated is None:
                deflated = _deflate(data)
            kept[key] = deflated
            out.append(deflated)
        out.append(_FINAL)
        out.append(struct.pack("<II", crc, size & 0xFFFFFFFF))
        self._previous = kept
        return out
