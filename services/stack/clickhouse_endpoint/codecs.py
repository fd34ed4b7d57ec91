"""Bytes on the wire: the request body's Content-Encoding or ``decompress=1`` framing removed (within a
decompression ratio, so a small bomb cannot become gigabytes), response compression, and the Content-Type of
each output format."""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from services.stack.clickhouse_endpoint.errors import (
    CANNOT_DECOMPRESS,
    QUERY_IS_TOO_LARGE,
    UNKNOWN_COMPRESSION_METHOD,
    ClickHouseError,
)

# Below this many decompressed bytes the ratio is not checked: small bodies of repetitive data (a column of
# zeros) compress far beyond any sane ratio and are harmless.
RATIO_FLOOR_BYTES = 1 << 24


def content_type(fmt: str) -> str:
    """The Content-Type ClickHouse sends for a result format."""
    if fmt.startswith(("TabSeparated", "TSV")):
        return "text/tab-separated-values; charset=UTF-8"
    if fmt.startswith("CSV"):
        header = "present" if "WithNames" in fmt else "absent"
        return f"text/csv; charset=UTF-8; header={header}"
    if fmt.startswith("JSON") and "EachRow" in fmt:
        return "application/x-ndjson; charset=UTF-8"
    if fmt.startswith("JSON"):
        return "application/json; charset=UTF-8"
    if fmt.startswith(("Native", "RowBinary", "Parquet", "Arrow", "ORC", "Avro", "Protobuf", "MsgPack", "Npy")):
        return "application/octet-stream"
    return "text/plain; charset=UTF-8"


OUTPUT_STEP = 1 << 22  # decompressed bytes produced per step, so the ratio is checked before memory fills


class _FramesDecoder:
    """Decodes a body that may be several concatenated compressed frames (clients compress block by block),
    producing at most OUTPUT_STEP bytes at a time (one gzip piece of 1 MiB can inflate to 1 GiB)."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self._current = factory()

    def decompress(self, data: bytes) -> Iterator[bytes]:
        fresh = True
        while True:
            obj = self._current
            if isinstance(obj, type(zlib.decompressobj())):
                out = obj.decompress(data, OUTPUT_STEP)
                data = obj.unconsumed_tail
                more = bool(data) or len(out) == OUTPUT_STEP
            else:  # lz4 and zstd: input is buffered inside; b"" asks for more of its output
                out = obj.decompress(data if fresh else b"", OUTPUT_STEP)
                fresh = False
                more = not obj.needs_input
            if out:
                yield out
            if obj.eof:
                data, fresh = obj.unused_data, True
                self._current = self._factory()
                if not data:
                    return
            elif not more:
                return


def _decoder_factories() -> dict[str, Callable[[], Any]]:
    factories: dict[str, Callable[[], Any]] = {
        # 32 + MAX_WBITS: accept a zlib or gzip header, as ClickHouse's inflating reader does.
        "gzip": lambda: zlib.decompressobj(32 + zlib.MAX_WBITS),
        "deflate": lambda: zlib.decompressobj(32 + zlib.MAX_WBITS),
        "x-gzip": lambda: zlib.decompressobj(32 + zlib.MAX_WBITS),
    }
    with contextlib.suppress(ImportError):
        import lz4.frame

        factories["lz4"] = lz4.frame.LZ4FrameDecompressor
    with contextlib.suppress(ImportError):
        # The backport of Python 3.14's compression.zstd, which clickhouse-connect itself uses.
        from backports import zstd

        factories["zstd"] = zstd.ZstdDecompressor
    return factories


_DECODERS = _decoder_factories()


def decode_body(pieces: Iterable[bytes], encoding: str, max_ratio: float | None = None) -> Iterator[bytes]:
    """The body with its Content-Encoding removed, piece by piece, at most `max_ratio` times its size."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        yield from pieces
        return
    factory = _DECODERS.get(encoding)
    if factory is None:
        raise ClickHouseError.make(UNKNOWN_COMPRESSION_METHOD, f"Unknown HTTP Content-Encoding: {encoding}")
    decoder = _FramesDecoder(factory)
    ratio = _RatioGuard(max_ratio, encoding)
    for piece in pieces:
        outputs = decoder.decompress(piece)
        ratio.check(len(piece), 0)
        while True:
            try:
                out = next(outputs, None)
            except Exception as exc:  # each library raises its own error type
                raise ClickHouseError.make(CANNOT_DECOMPRESS, f"Cannot decompress {encoding} body: {exc}") from exc
            if out is None:
                break
            ratio.check(0, len(out))
            yield out


class _RatioGuard:
    """Refuses a body that decompresses to more than max_ratio times its compressed size (a decompression bomb)."""

    def __init__(self, max_ratio: float | None, what: str) -> None:
        self.max_ratio = max_ratio
        self.what = what
        self.compressed = 0
        self.decompressed = 0

    def check(self, compressed: int, decompressed: int) -> None:
        self.compressed += compressed
        self.decompressed += decompressed
        if self.max_ratio is None or self.decompressed <= RATIO_FLOOR_BYTES:
            return
        if self.decompressed > self.max_ratio * max(self.compressed, 1):
            raise ClickHouseError.make(
                QUERY_IS_TOO_LARGE,
                f"The {self.what} request body decompresses to more than {self.max_ratio:g} times its size "
                f"({self.decompressed} bytes from {self.compressed}); refused as a decompression bomb "
                "(FLYWHEEL_CLICKHOUSE_MAX_DECOMPRESS_RATIO)",
            )


def decode_native_blocks(pieces: Iterable[bytes], max_ratio: float | None = None) -> Iterator[bytes]:
    """``decompress=1``: ClickHouse's own compressed framing (checksum, method, sizes, payload).

    Checksums are not verified (as with http_native_compression_disable_checksumming_on_decompress):
    the transport is loopback TCP, and CityHash128 is not available here.
    """
    buf = bytearray()
    ratio = _RatioGuard(max_ratio, "decompress=1")
    for piece in pieces:
        buf += piece
        while len(buf) >= 25:
            method = buf[16]
            compressed_size = int.from_bytes(buf[17:21], "little")  # includes the 9-byte method/sizes header
            size = int.from_bytes(buf[21:25], "little")
            end = 16 + compressed_size
            if len(buf) < end:
                break
            ratio.check(end, size)  # checked on the sizes the header declares, before decompressing
            yield _native_block(method, bytes(buf[25:end]), size)
            del buf[:end]
    if buf:
        raise ClickHouseError.make(CANNOT_DECOMPRESS, "Truncated compressed block in request body")


def _native_block(method: int, payload: bytes, size: int) -> bytes:
    if method == 0x02:
        return payload
    try:
        if method == 0x82:
            import lz4.block

            return lz4.block.decompress(payload, uncompressed_size=size)
        if method == 0x90:
            from backports import zstd

            return zstd.decompress(payload)
    except Exception as exc:
        raise ClickHouseError.make(CANNOT_DECOMPRESS, f"Cannot decompress block: {exc}") from exc
    raise ClickHouseError.make(UNKNOWN_COMPRESSION_METHOD, f"Unknown compression method 0x{method:02x}")


# Response compression ---------------------------------------------------------------------------------------
class Encoder(Protocol):
    def compress(self, data: bytes) -> bytes: ...
    def flush(self) -> bytes: ...


class _ZlibEncoder:
    def __init__(self, level: int, wbits: int) -> None:
        self._obj = zlib.compressobj(max(1, min(level, 9)), zlib.DEFLATED, wbits)

    def compress(self, data: bytes) -> bytes:
        return self._obj.compress(data) + self._obj.flush(zlib.Z_SYNC_FLUSH)

    def flush(self) -> bytes:
        return self._obj.flush()


class _Lz4Encoder:
    """One LZ4 frame for the whole response: clickhouse-connect reads it with a single frame decompressor."""

    def __init__(self) -> None:
        import lz4.frame

        self._obj = lz4.frame.LZ4FrameCompressor()
        self._started = False

    def compress(self, data: bytes) -> bytes:
        prefix = b"" if self._started else self._obj.begin()
        self._started = True
        return prefix + self._obj.compress(data)

    def flush(self) -> bytes:
        prefix = b"" if self._started else self._obj.begin()
        self._started = True
        return prefix + self._obj.flush()


class _ZstdEncoder:
    def __init__(self) -> None:
        from backports import zstd

        self._obj = zstd.ZstdCompressor()
        self._block = zstd.ZstdCompressor.FLUSH_BLOCK

    def compress(self, data: bytes) -> bytes:
        return self._obj.compress(data, self._block)

    def flush(self) -> bytes:
        return self._obj.flush()


def _encoder_factories() -> dict[str, Callable[[int], Encoder]]:
    factories: dict[str, Callable[[int], Encoder]] = {
        "gzip": lambda level: _ZlibEncoder(level, 16 + zlib.MAX_WBITS),
        "deflate": lambda level: _ZlibEncoder(level, zlib.MAX_WBITS),
    }
    if "lz4" in _DECODERS:
        factories["lz4"] = lambda level: _Lz4Encoder()
    if "zstd" in _DECODERS:
        factories["zstd"] = lambda level: _ZstdEncoder()
    return factories


ENCODERS = _encoder_factories()


def choose_encoding(accept_encoding: str) -> str | None:
    """The first encoding the client lists that we can produce (clients list their preference first)."""
    for item in accept_encoding.split(","):
        name = item.split(";", 1)[0].strip().lower()
        if name in ENCODERS:
            return name
    return None
