"""512 KiB EBS blocks: the block size, and the cutting of a raw stream into non-zero blocks.

Standard library only: ``fedimg.snapshot`` and ``fedimg.xzparallel`` use it,
and so does the xz decoder child process (``fedimg.xzdecoder``), which must
start fast.
"""

from __future__ import annotations

BLOCK_SIZE = 524288  # AWS's EBS block size; moto's reported BlockSize (512) is wrong
ZERO_BLOCK = bytes(BLOCK_SIZE)


class Reblocker:
    """Cuts a stream of chunks of any size into 512 KiB blocks and drops the all-zero ones.

    The stream starts at block ``first_index`` (0: the start of the image).

    ``push`` returns the non-zero (index, block) pairs completed by a chunk;
    ``finish`` returns the final partial block, zero-padded, if not all zero.
    Zero data is recognised in place (``bytes.startswith`` against a zero
    block is one memcmp, no copy) and never copied: only non-zero blocks are
    materialised. This is the hot path of an upload, whatever the alignment
    of the chunks the decompressor hands out.
    """

    def __init__(self, block_size: int = BLOCK_SIZE, first_index: int = 0) -> None:
        self.block_size = block_size
        self.next_index = first_index
        self._zero = memoryview(bytes(block_size))
        self._pending = 0  # bytes of the current, incomplete block
        self._pending_zero = True  # ... all zero so far (then they are not kept)
        self._pieces: list[bytes] = []

    def push(self, chunk: bytes) -> list[tuple[int, bytes]]:
        if not isinstance(chunk, bytes | bytearray):
            chunk = bytes(chunk)
        size = self.block_size
        end = len(chunk)
        out: list[tuple[int, bytes]] = []
        pos = 0
        if self._pending:
            pos = min(size - self._pending, end)
            self._keep(chunk, 0, pos)
            if self._pending == size:
                self._close_block(out)
        zero = self._zero
        while end - pos >= size:
            if not chunk.startswith(zero, pos):
                out.append((self.next_index, chunk[pos : pos + size]))
            self.next_index += 1
            pos += size
        if pos < end:
            self._keep(chunk, pos, end)
        return out

    def finish(self) -> list[tuple[int, bytes]]:
        """The final partial block, zero-padded, unless it is all zero."""
        out: list[tuple[int, bytes]] = []
        if self._pending:
            if not self._pending_zero:
                self._pieces.append(bytes(self.block_size - self._pending))
            self._pending = self.block_size
            self._close_block(out)
        return out

    def _keep(self, chunk: bytes, start: int, stop: int) -> None:
        """Add chunk[start:stop] to the incomplete block, copying only non-zero data."""
        length = stop - start
        if self._pending_zero:
            if chunk.startswith(self._zero[:length], start):
                self._pending += length
                return
            self._pending_zero = False
            if self._pending:
                self._pieces.append(bytes(self._pending))
        self._pieces.append(chunk[start:stop])
        self._pending += length

    def _close_block(self, out: list[tuple[int, bytes]]) -> None:
        if not self._pending_zero:
            out.append((self.next_index, b"".join(self._pieces)))
        self.next_index += 1
        self._pending = 0
        self._pending_zero = True
        self._pieces = []
