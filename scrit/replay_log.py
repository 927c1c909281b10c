"""Append-only, crash-safe record log of msgspec messages (Ray-free core of the replay buffer).

Why a hand-rolled log: validated training examples are expensive (solver + critic + corrector +
validator calls each), so once ``append`` returns they must survive a crash, and a crash *during* a
write must never turn into a half-read or mis-read example on restart.

File format, one record after another, nothing else::

    MAGIC (2 bytes, b"SR") | length (4 bytes, little-endian) | CRC32 of payload (4 bytes, LE) | payload

where the payload is the msgpack encoding of one message (``scrit.messages.encode``).

Opening a log scans it from the start and stops at the first record that is not fully valid: header
incomplete, wrong magic, absurd length, payload short, CRC mismatch, or payload that does not decode
to the expected message type. That record and *everything after it* is treated as a torn tail:

* the bytes are copied to ``path.with_suffix(".torn-<offset>")`` (fsynced; never overwritten) so
  nothing is destroyed silently,
* a warning names the byte offset,
* the log is truncated to the last good record, so later appends are never stitched onto garbage.

A corrupt record in the *middle* (bit rot, a bad disk block) is handled the same way: the log ends
there and the valid records after it are kept only in the ``.torn`` file. We do not try to resync
on the next magic bytes, because a length field we cannot trust makes "the next record" a guess, and
a guess can mis-read payload bytes as a record. Losing the live tail (kept on disk for manual
recovery) is the safe failure; silently training on a mis-read example is not.

One writer per file: the writing handle holds an exclusive ``flock``, because a second writer (or a
second opener truncating what it thinks is a torn tail while the first is mid-append) would corrupt
the log. ``readonly=True`` opens for inspection without locking or truncating.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from scrit.messages import Message, MessageDecodeError, TrainingExample, decode, encode

try:  # POSIX only; on other systems the single-writer rule is just documented
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = ["MAGIC", "HEADER", "MAX_RECORD_BYTES", "RecordLog", "LogLockedError", "LogCorruptError",
           "frame"]

log = logging.getLogger(__name__)

MAGIC = b"SR"
HEADER = struct.Struct("<2sII")  # magic, payload length, CRC32(payload)
MAX_RECORD_BYTES = 64 * 1024 * 1024  # a longer length field is corruption, not an example


class LogLockedError(RuntimeError):
    """Another open handle (this or another process) is already writing this log."""


class LogCorruptError(RuntimeError):
    """The log changed under us after it was validated on open (never returned as data)."""


def frame(message: Message) -> bytes:
    """One framed record: header + msgpack payload."""
    payload = encode(message)
    if len(payload) > MAX_RECORD_BYTES:
        raise ValueError(f"record of {len(payload)} bytes exceeds MAX_RECORD_BYTES ({MAX_RECORD_BYTES})")
    return HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def _fsync_dir(directory: Path) -> None:
    """Make a created/renamed file's directory entry durable (a fsynced file can still vanish without it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _read_record(
    fh: BinaryIO, expected: type[Message] | None, max_bytes: int
) -> tuple[Message | None, int, str]:
    """Read one record at the current position: (message, bytes consumed, problem); problem '' = ok,
    'eof' = clean end of file, anything else = why the record is not valid."""
    header = fh.read(HEADER.size)
    if not header:
        return None, 0, "eof"
    if len(header) < HEADER.size:
        return None, 0, f"incomplete header ({len(header)} of {HEADER.size} bytes)"
    magic, length, crc = HEADER.unpack(header)
    if magic != MAGIC:
        return None, 0, f"bad magic {magic!r}"
    if length == 0 or length > max_bytes:
        return None, 0, f"absurd length {length}"
    payload = fh.read(length)
    if len(payload) < length:
        return None, 0, f"truncated payload ({len(payload)} of {length} bytes)"
    if zlib.crc32(payload) != crc:
        return None, 0, "CRC mismatch"
    try:
        message = decode(payload, expected)
    except MessageDecodeError as error:
        return None, 0, f"payload does not decode: {error}"
    return message, HEADER.size + length, ""


class RecordLog:
    """An append-only log of messages, validated and repaired (torn tail cut off) on open.

    ``expected`` is the message type every record must decode to (``None``: any scrit message).
    Attributes after open: ``count`` (valid records), ``size`` (bytes), ``torn_offset`` /
    ``torn_bytes`` / ``torn_path`` / ``torn_reason`` describing a cut-off tail (None / 0 if none).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        expected: type[Message] | None = TrainingExample,
        readonly: bool = False,
        max_record_bytes: int = MAX_RECORD_BYTES,
    ) -> None:
        self.path = Path(path)
        self.expected = expected
        self.readonly = readonly
        self.max_record_bytes = max_record_bytes
        self.torn_offset: int | None = None
        self.torn_bytes = 0
        self.torn_path: Path | None = None
        self.torn_reason: str | None = None
        self._lock = threading.Lock()
        self._fh: BinaryIO | None = None
        if readonly:
            self.count, self.size, torn = self._scan()
            if torn is not None:  # report, but leave the file alone: a live writer may own it
                self.torn_offset, self.torn_reason = self.size, torn
                self.torn_bytes = self.path.stat().st_size - self.size
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        fh = open(self.path, "ab")  # O_APPEND: every write lands at the end
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError as error:
                    raise LogLockedError(f"{self.path} is already open for writing elsewhere") from error
            if created:
                _fsync_dir(self.path.parent)
            self.count, self.size, torn = self._scan()
            if torn is not None:
                self._cut_tail(fh, torn)
        except BaseException:
            fh.close()
            raise
        self._fh = fh

    # ----------------------------------------------------------------------------------------------

    def _scan(self) -> tuple[int, int, str | None]:
        """(valid records, byte offset after the last valid one, why the scan stopped early or None)."""
        count = offset = 0
        try:
            fh = open(self.path, "rb")
        except FileNotFoundError:
            if self.readonly:
                raise
            return 0, 0, None
        with fh:
            while True:
                message, used, problem = _read_record(fh, self.expected, self.max_record_bytes)
                if problem == "eof":
                    return count, offset, None
                if problem:
                    return count, offset, problem
                count += 1
                offset += used

    def _cut_tail(self, fh: BinaryIO, reason: str) -> None:
        """Preserve the bytes after the last good record in a .torn file, then truncate them away."""
        offset = self.size
        with open(self.path, "rb") as src:
            src.seek(offset)
            tail = src.read()
        target = self.path.with_suffix(f".torn-{offset}")
        n = 1
        while target.exists():  # an earlier tear at the same offset: never overwrite it
            target = self.path.with_suffix(f".torn-{offset}-{n}")
            n += 1
        with open(target, "xb") as out:
            out.write(tail)
            out.flush()
            os.fsync(out.fileno())
        _fsync_dir(self.path.parent)
        # Only after the copy is durable do we drop the bytes from the live log.
        os.truncate(fh.fileno(), offset)
        os.fsync(fh.fileno())
        more = " (more data follows the bad record: mid-file corruption, valid records after it are" \
               " only in the .torn file)" if self._tail_has_more(tail) else ""
        log.warning("%s: torn/corrupt record at byte offset %d (%s); %d bytes moved to %s and the log "
                    "truncated to %d valid records%s", self.path, offset, reason, len(tail), target,
                    self.count, more)
        self.torn_offset, self.torn_bytes, self.torn_path, self.torn_reason = offset, len(tail), target, reason

    def _tail_has_more(self, tail: bytes) -> bool:
        """Whether the tail is longer than the one (partial) record it starts with: a hint for the
        warning that this was corruption mid-file rather than a crash during the last append."""
        if len(tail) < HEADER.size:
            return False
        magic, length, _ = HEADER.unpack_from(tail)
        return magic == MAGIC and 0 < length <= self.max_record_bytes and len(tail) > HEADER.size + length

    # ----------------------------------------------------------------------------------------------

    def append(self, messages: Iterable[Message], *, sync: bool = True) -> int:
        """Write all ``messages`` in one write; with ``sync`` they are on disk when this returns.

        On a failed write (e.g. disk full) the file is cut back to where it was, so a partial batch
        never sits in front of later appends.
        """
        if self._fh is None:
            raise ValueError(f"{self.path} is {'read-only' if self.readonly else 'closed'}")
        items = list(messages)
        if self.expected is not None:
            for item in items:
                if not isinstance(item, self.expected):
                    raise TypeError(f"expected {self.expected.__name__}, got {type(item).__name__}")
        if not items:
            return 0
        data = b"".join(frame(item) for item in items)
        with self._lock:
            fd = self._fh.fileno()
            try:
                self._fh.write(data)
                self._fh.flush()
                if sync:
                    os.fsync(fd)
            except BaseException:
                try:
                    os.truncate(fd, self.size)
                except OSError:  # pragma: no cover - the next open cuts the torn tail instead
                    pass
                raise
            self.size += len(data)
            self.count += len(items)
        return len(items)

    def read_all(self) -> Iterator[Message]:
        """Every valid record, in append order (up to the size known when the iteration starts).

        Raises LogCorruptError if the file no longer matches what was validated, never mis-reads.
        """
        end = self.size
        with open(self.path, "rb") as fh:
            offset = 0
            while offset < end:
                message, used, problem = _read_record(fh, self.expected, self.max_record_bytes)
                if problem:
                    raise LogCorruptError(f"{self.path}: record at byte offset {offset}: {problem}")
                assert message is not None
                offset += used
                yield message

    def __len__(self) -> int:
        return self.count

    def close(self) -> None:
        """Release the file and its writer lock."""
        if self._fh is not None:
            self._fh.close()  # closing the descriptor drops the flock
            self._fh = None

    def __enter__(self) -> RecordLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass
