"""Replay buffer: durable log (torn tails, SIGKILL mid-write), balance, staleness, backpressure, Ray shell."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from scrit.actors.replay_buffer import ReplayBuffer, buffer_options
from scrit.rundir import buffer_log_path
from scrit.messages import Problem, TrainingExample, encode
from scrit.replay_log import HEADER, MAGIC, LogLockedError, RecordLog, frame

REPO = Path(__file__).resolve().parents[1]


def ex(i: int, correct: bool = True, version: int = 0, size: int = 0) -> TrainingExample:
    return TrainingExample(prompt=f"problem {i}" + "x" * size, target=f"critique {i}", student_correct=correct,
                           problem_id=f"p{i}", version=version, created_at=1000.0 + i)


# --------------------------------------------------------------------------------------------------
# RecordLog


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    items = [ex(i, correct=i % 2 == 0, version=i % 3) for i in range(20)]
    with RecordLog(path) as rlog:
        assert rlog.append(items[:5]) == 5
        assert rlog.append(items[5:], sync=False) == 15
        assert rlog.append([]) == 0
        assert list(rlog.read_all()) == items
    with RecordLog(path) as rlog:
        assert rlog.count == 20 and rlog.torn_path is None
        assert list(rlog.read_all()) == items
    assert not list(tmp_path.glob("*.torn-*"))


def test_append_rejects_wrong_type(tmp_path: Path) -> None:
    with RecordLog(tmp_path / "a.log") as rlog:
        with pytest.raises(TypeError):
            rlog.append([ex(0), Problem(id="p", domain="arith", question="q", answer="1")])
        assert rlog.count == 0 and rlog.size == 0  # nothing half-written


def _good_then(tail: bytes, tmp_path: Path, n: int = 5) -> tuple[Path, list[TrainingExample]]:
    path = tmp_path / "t.log"
    items = [ex(i, correct=i % 2 == 0) for i in range(n)]
    with RecordLog(path) as rlog:
        rlog.append(items)
    with open(path, "ab") as fh:
        fh.write(tail)
    return path, items


def _flip_crc(record: bytes) -> bytes:
    data = bytearray(record)
    data[len(MAGIC) + 4] ^= 0xFF  # first CRC byte
    return bytes(data)


REC = frame(ex(99, size=200))
TAILS = {
    "partial-header": REC[:7],
    "random-bytes": os.urandom(64),
    "zeros": bytes(300),  # what a crash can leave after a size update without the data
    "truncated-payload": REC[:-10],
    "flipped-crc": _flip_crc(REC),
    "flipped-payload-byte": REC[:-5] + b"y" + REC[-4:],  # still decodes; only the CRC catches it
    "absurd-length": MAGIC + (2**31).to_bytes(4, "little") + b"\0" * 20,
    "crc-ok-not-a-message": HEADER.pack(MAGIC, 3, __import__("zlib").crc32(b"abc")) + b"abc",
}


@pytest.mark.parametrize("kind", list(TAILS))
def test_torn_tail_is_cut_and_kept(kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tail = TAILS[kind]
    path, items = _good_then(tail, tmp_path)
    good_size = path.stat().st_size - len(tail)
    with caplog.at_level(logging.WARNING, logger="scrit.replay_log"):
        rlog = RecordLog(path)
    assert list(rlog.read_all()) == items
    assert rlog.torn_offset == good_size and rlog.torn_bytes == len(tail)
    assert f"offset {good_size}" in caplog.text
    torn = path.with_suffix(f".torn-{good_size}")
    assert rlog.torn_path == torn and torn.read_bytes() == tail  # nothing destroyed silently
    assert path.stat().st_size == good_size  # truncated: next appends are not stitched onto garbage
    more = [ex(100 + i, correct=False) for i in range(3)]
    rlog.append(more)
    rlog.close()
    with RecordLog(path) as again:
        assert list(again.read_all()) == items + more
        assert again.torn_path is None


def test_corrupt_record_mid_file_is_never_misread(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A bad CRC in the middle ends the log there; the valid records after it go to the .torn file."""
    path = tmp_path / "m.log"
    items = [ex(i) for i in range(6)]
    records = [frame(item) for item in items]
    bad = 3
    path.write_bytes(b"".join(records[:bad]) + _flip_crc(records[bad]) + b"".join(records[bad + 1:]))
    offset = sum(len(r) for r in records[:bad])
    with caplog.at_level(logging.WARNING, logger="scrit.replay_log"):
        rlog = RecordLog(path)
    assert list(rlog.read_all()) == items[:bad]
    assert "mid-file corruption" in caplog.text
    assert path.with_suffix(f".torn-{offset}").read_bytes() == _flip_crc(records[bad]) + b"".join(records[bad + 1:])
    rlog.close()


def test_second_tear_at_same_offset_does_not_overwrite(tmp_path: Path) -> None:
    path, _ = _good_then(b"first garbage", tmp_path)
    RecordLog(path).close()
    with open(path, "ab") as fh:
        fh.write(b"second garbage")
    with RecordLog(path) as rlog:
        first = path.with_suffix(f".torn-{rlog.size}")
        assert first.read_bytes() == b"first garbage"
        assert rlog.torn_path != first and rlog.torn_path.read_bytes() == b"second garbage"


def test_single_writer_and_readonly(tmp_path: Path) -> None:
    path = tmp_path / "w.log"
    with RecordLog(path) as writer:
        writer.append([ex(0), ex(1)])
        with pytest.raises(LogLockedError):
            RecordLog(path)  # a second writer would truncate the first one's in-flight record
        with open(path, "ab") as fh:
            fh.write(REC[:20])  # an append in flight
        reader = RecordLog(path, readonly=True)
        assert list(reader.read_all()) == [ex(0), ex(1)] and reader.torn_bytes == 20
        assert path.stat().st_size == writer.size + 20  # readonly never truncates
        with pytest.raises(ValueError):
            reader.append([ex(2)])


# --------------------------------------------------------------------------------------------------
# Crash durability: SIGKILL a writer mid-run


WRITER = textwrap.dedent(
    """
    import sys
    from scrit.actors.replay_buffer import ReplayBuffer
    from scrit.messages import TrainingExample
    assert "ray" not in sys.modules, "importing the buffer must not import Ray"
    buf = ReplayBuffer(sys.argv[1], capacity=64, max_ahead=10**9)
    if sys.argv[2] == "torn":  # the 4th write stalls halfway (a slow disk): the kill tears a record
        import os, time

        class StallingFile:
            writes = 0
            def __init__(self, fh):
                self.fh = fh
            def write(self, data):
                StallingFile.writes += 1
                if StallingFile.writes < 4:
                    return self.fh.write(data)
                os.write(self.fh.fileno(), data[:len(data) * 5 // 8])  # 2.5 records
                print("stalled", flush=True)
                time.sleep(60)
            def __getattr__(self, name):
                return getattr(self.fh, name)

        buf._log._fh = StallingFile(buf._log._fh)
    i = 0
    print("ready", flush=True)
    while True:
        batch = [TrainingExample(prompt=f"problem {i + k}" + "y" * 20000, target=f"critique {i + k}",
                                 student_correct=(i + k) % 3 == 0, problem_id=f"p{i + k}", version=(i + k) // 50,
                                 created_at=float(i + k)) for k in range(4)]
        buf.put(batch)
        i += 4
        print(i, flush=True)  # acknowledged: put returned
    """
)


def _expected(j: int) -> TrainingExample:
    return TrainingExample(prompt=f"problem {j}" + "y" * 20000, target=f"critique {j}", student_correct=j % 3 == 0,
                           problem_id=f"p{j}", version=j // 50, created_at=float(j))


@pytest.mark.parametrize("disk", ["fast", "torn"])
def test_sigkill_mid_write_loses_nothing_acknowledged(disk: str, tmp_path: Path) -> None:
    """``fast``: a kill wherever the loop happens to be; ``torn``: the 4th put stalls with half a
    batch on disk when the kill comes, so reopening must cut a real torn record and lose no acked data."""
    want = 40 if disk == "fast" else 12
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), disk], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    acked = 0
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read() if proc.stderr else ""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line or line.strip() == "stalled":
                break
            acked = int(line)
            if disk == "fast" and acked >= want:
                time.sleep(0.003)  # land the kill somewhere in the next put
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
    for line in out.split():
        if line != "stalled":
            acked = max(acked, int(line))
    assert acked >= want, err
    buf = ReplayBuffer(tmp_path, capacity=10**6)
    try:
        if disk == "torn":  # the kill landed mid-record: 12 acked, 2.5 records of the next batch on disk
            assert acked == 12 and buf.stats()["torn_bytes"] > 0 and buf.stats()["total_appended"] == 14
        got = [example for _, example in buf._window]
        assert len(got) >= acked  # nothing acknowledged is lost
        assert len(got) <= acked + 4  # at most the batch in flight, and only complete records of it
        assert got == [_expected(j) for j in range(len(got))]  # no garbage, no mis-read
        assert buf.stats()["total_appended"] == len(got)
        buf.put([ex(10**6)])
    finally:
        buf.close()
    with RecordLog(buffer_log_path(tmp_path)) as rlog:
        assert rlog.count == len(got) + 1 and rlog.torn_path is None


# --------------------------------------------------------------------------------------------------
# Balance, staleness, backpressure, stats


def _pool(buf: ReplayBuffer, n_correct: int, n_incorrect: int, version: int = 0, start: int = 0) -> None:
    buf.put([ex(start + i, True, version) for i in range(n_correct)])
    buf.put([ex(start + n_correct + i, False, version) for i in range(n_incorrect)])


def test_balance_default_one_to_one(tmp_path: Path) -> None:
    buf = ReplayBuffer(tmp_path, capacity=1000, max_ahead=1000)
    _pool(buf, 70, 30)
    for _ in range(20):
        batch = buf.sample(10, current_version=0)
        assert batch is not None
        assert Counter(e.student_correct for e in batch) == {True: 5, False: 5}
        assert len({e.problem_id for e in batch}) == 10
    buf.close()


def test_sample_without_a_version_uses_the_last_one_set(tmp_path: Path) -> None:
    buf = ReplayBuffer(tmp_path, capacity=1000, max_ahead=1000, max_staleness=0)
    _pool(buf, 10, 10)
    buf.set_version(1)
    assert buf.sample(4) is None  # version-0 examples are too stale for a version-1 trainer
    buf.set_version(0)
    batch = buf.sample(4)
    assert batch is not None and len(batch) == 4
    buf.close()


def test_balance_ratio_configurable(tmp_path: Path) -> None:
    buf = ReplayBuffer(tmp_path, capacity=1000, correct_ratio=0.25, max_ahead=1000)
    _pool(buf, 30, 70)
    batch = buf.sample(8, 0)
    assert batch is not None and Counter(e.student_correct for e in batch) == {True: 2, False: 6}
    buf.close()


def test_short_class_strict_none_else_fill(tmp_path: Path) -> None:
    strict = ReplayBuffer(tmp_path / "s", capacity=100, max_ahead=100)
    _pool(strict, 2, 20)
    assert strict.sample(10, 0) is None
    assert strict.stats()["short_samples"] == 1
    strict.close()
    loose = ReplayBuffer(tmp_path / "l", capacity=100, max_ahead=100, strict=False)
    _pool(loose, 2, 20)
    batch = loose.sample(10, 0)
    assert batch is not None and Counter(e.student_correct for e in batch) == {True: 2, False: 8}
    assert loose.sample(30, 0) is None  # not enough examples in total
    loose.close()


def test_without_replacement_within_epoch(tmp_path: Path) -> None:
    buf = ReplayBuffer(tmp_path, capacity=100, max_ahead=100)
    _pool(buf, 10, 10)
    seen: list[str] = []
    for _ in range(5):
        batch = buf.sample(4, 0)
        assert batch is not None
        seen += [e.problem_id for e in batch]
    assert len(set(seen)) == 20  # the whole eligible pool once before any repeat
    buf.close()


def test_reuse_cap_retires_examples_until_fresh_data_arrives(tmp_path: Path) -> None:
    buf = ReplayBuffer(tmp_path, capacity=100, max_ahead=100, max_reuse=2)
    _pool(buf, 4, 4)
    draws: Counter[str] = Counter()
    for _ in range(4):  # 4 batches x 4 = 16 draws = every example exactly twice
        batch = buf.sample(4, 0)
        assert batch is not None
        draws.update(e.problem_id for e in batch)
    assert set(draws.values()) == {2} and len(draws) == 8
    assert buf.sample(4, 0) is None  # all retired: the trainer waits instead of a third epoch
    assert buf.stats()["retired"] == 8 and buf.stats()["eligible"] == 0
    _pool(buf, 2, 2, start=100)
    batch = buf.sample(4, 0)
    assert batch is not None and {e.problem_id for e in batch} == {ex(100 + i).problem_id for i in range(4)}
    buf.close()
    with pytest.raises(ValueError, match="max_reuse"):
        ReplayBuffer(tmp_path / "bad", max_reuse=-1)


def test_every_buffer_config_key_reaches_the_buffer(tmp_path: Path) -> None:
    import msgspec

    from scrit.config import BufferConfig

    cfg = BufferConfig(capacity=50, correct_ratio=0.25, max_staleness=3, max_ahead=7, max_reuse=2, strict=False)
    assert set(buffer_options(cfg)) == {f.name for f in msgspec.structs.fields(BufferConfig)}
    buf = ReplayBuffer(tmp_path, **buffer_options(cfg))
    assert (buf.capacity, buf.correct_ratio, buf.max_staleness, buf.max_ahead, buf.max_reuse, buf.strict) == (
        50, 0.25, 3, 7, 2, False)
    buf.close()


def test_staleness_bound(tmp_path: Path) -> None:
    buf = ReplayBuffer(tmp_path, capacity=1000, max_staleness=1, max_ahead=1000)
    for version in range(5):
        _pool(buf, 10, 10, version=version, start=100 * version)
    for _ in range(10):
        batch = buf.sample(8, current_version=4)
        assert batch is not None and all(e.version >= 3 for e in batch)
    stats = buf.stats()
    assert stats["eligible"] == 40 and stats["eligible_correct"] == 20
    assert buf.sample(8, current_version=6) is None  # everything is too old
    buf.close()


def test_max_staleness_zero_is_synchronous(tmp_path: Path) -> None:
    buf = ReplayBuffer(tmp_path, capacity=1000, max_staleness=0, max_ahead=1000)
    _pool(buf, 10, 10, version=2)
    _pool(buf, 3, 3, version=3, start=100)
    batch = buf.sample(6, current_version=3)
    assert batch is not None and {e.version for e in batch} == {3}
    assert buf.sample(8, current_version=3) is None  # version 2 data must not fill in
    buf.close()


def test_backpressure_counts_what_the_trainer_can_still_use(tmp_path: Path) -> None:
    buf = ReplayBuffer(tmp_path, capacity=100, max_ahead=10)
    assert buf.room() == 10
    _pool(buf, 3, 3)
    assert buf.room() == 4
    _pool(buf, 4, 4, start=10)
    assert buf.room() == 0  # 14 usable ahead: never negative, a producer loop `while room() == 0` waits
    assert asyncio.run(buf.wait_for_room(timeout=0.05)) == 0
    assert buf.sample(4, 0) is not None  # 10 fresh left: still no room
    assert buf.room() == 0
    assert buf.sample(4, 0) is not None and buf.sample(4, 0) is not None  # 1 + 1 fresh left
    assert buf.room() == 8
    buf.set_version(5)  # everything is now too stale to train on (max_staleness 1): room for fresh data
    assert buf.room() == 10
    buf.put([ex(50, version=5)])
    assert asyncio.run(buf.wait_for_room(timeout=0.05)) == 10  # one class alone makes no batch
    buf.close()


def test_a_short_class_keeps_the_room_open(tmp_path: Path) -> None:
    """A trainer that cannot get a balanced batch must not be blocked by its own producers."""
    buf = ReplayBuffer(tmp_path, capacity=100, max_ahead=4)
    buf.put([ex(i, False) for i in range(40)])
    assert buf.room() == 4 and buf.sample(4, 0) is None
    buf.put([ex(100 + i, True) for i in range(2)])
    assert buf.room() == 0  # 2 correct + 2 incorrect: one batch's worth is ready
    buf.close()


def test_stats(tmp_path: Path) -> None:
    buf = ReplayBuffer(tmp_path, capacity=10, max_staleness=2, max_ahead=100)
    assert buf.stats()["balance"] is None and buf.stats()["size"] == 0
    buf.put([ex(i, correct=i < 3, version=i) for i in range(6)])  # versions 0..5, 3 correct
    buf.set_version(5)
    s = buf.stats()
    assert (s["size"], s["n_correct"], s["n_incorrect"]) == (6, 3, 3)
    assert s["balance"] == pytest.approx(0.5)
    assert (s["eligible"], s["eligible_correct"], s["eligible_incorrect"]) == (3, 0, 3)  # versions 3..5
    assert s["staleness_max"] == 5 and s["staleness_mean"] == pytest.approx(2.5)
    assert s["total_appended"] == 6 and s["version"] == 5 and s["room"] == 100  # no correct one: no batch
    # capacity: the window keeps the newest 10, the log keeps everything
    buf.put([ex(10 + i, correct=False, version=5) for i in range(8)])
    s = buf.stats()
    assert s["size"] == 10 and s["total_appended"] == 14
    assert s["n_correct"] == 0 and s["balance"] == 0.0
    buf.close()
    with RecordLog(buffer_log_path(tmp_path)) as rlog:
        assert rlog.count == 14


def test_resume_from_log(tmp_path: Path) -> None:
    buf = ReplayBuffer(tmp_path, capacity=5, max_ahead=100)
    items = [ex(i, correct=i % 2 == 0, version=1) for i in range(8)]
    buf.put(items)
    buf.close()
    with open(buffer_log_path(tmp_path), "ab") as fh:
        fh.write(frame(ex(999))[:-3])  # a crash during the next put
    again = ReplayBuffer(tmp_path, capacity=5, max_ahead=100)
    s = again.stats()
    assert s["total_appended"] == 8 and s["resumed"] == 8 and s["size"] == 5 and s["torn_bytes"] > 0
    assert [e for _, e in again._window] == items[-5:]
    again.close()


def test_buffer_module_does_not_import_ray() -> None:
    code = "import sys, scrit.actors.replay_buffer; print('ray' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


# --------------------------------------------------------------------------------------------------
# Ray actor shell


def test_ray_actor_shell(ray_session, tmp_path: Path) -> None:
    ray = ray_session
    from scrit.actors.replay_buffer import replay_buffer_actor

    actor = replay_buffer_actor(run_dir=str(tmp_path), capacity=100, max_ahead=8)
    assert ray.get(actor.put.remote([ex(i, i % 2 == 0, version=1) for i in range(8)])) == 8
    assert ray.get(actor.room.remote()) == 0
    waiting = actor.wait_for_room.remote(timeout=30)  # async: must not block the sample below
    batch = ray.get(actor.sample.remote(4, 1))
    assert batch is not None and Counter(e.student_correct for e in batch) == {True: 2, False: 2}
    assert ray.get(waiting, timeout=30) == 4  # half the pool was drawn
    stats = ray.get(actor.stats.remote())
    assert stats["size"] == 8 and stats["samples"] == 1 and stats["balance"] == 0.5
    ray.kill(actor)
    # what the actor acknowledged is on disk
    with RecordLog(buffer_log_path(tmp_path), readonly=True) as rlog:
        assert rlog.count == 8


def test_put_batch_stores_a_batch_once_and_reports_it(tmp_path: Path) -> None:
    """A batch sent again after a crash (its first put had reached the log) is not stored twice,
    also by a buffer restarted from the log."""
    import msgspec

    from scrit.messages import ExampleBatch, StageTiming

    examples = [msgspec.structs.replace(ex(i, i % 2 == 0), batch_id=7) for i in range(4)]
    batch = ExampleBatch(batch_id=7, examples=examples, counts={"validated": 4},
                         timings=[StageTiming("validate", "validator.0", 1.0, 2.0)])
    buf = ReplayBuffer(tmp_path, max_ahead=100)
    report = buf.put_batch(encode(batch))
    assert report["kept"] == 4 and not report["duplicate"] and report["validated"] == 4
    assert [t["stage"] for t in report["timings"]] == ["validate", "put"] and report["buffer_size"] == 4
    assert buf.put_batch(batch)["kept"] == 0
    buf.close()
    restarted = ReplayBuffer(tmp_path, max_ahead=100)
    again = restarted.put_batch(batch)
    assert again["duplicate"] and again["kept"] == 0 and restarted.stats()["size"] == 4
    assert restarted.stats()["last_batch_id"] == 7
    restarted.close()


def test_backpressure_with_a_reuse_cap_counts_only_examples_never_drawn(tmp_path: Path) -> None:
    """Examples the trainer has drawn do not hold the producers back: a trainer that reuses them is
    short of fresh data. Only fresh, never-drawn examples fill the room."""
    buf = ReplayBuffer(tmp_path, capacity=100, max_ahead=10, max_reuse=3)
    _pool(buf, 6, 6)
    assert buf.room() == 0  # 12 fresh examples ahead
    assert buf.sample(4, 0) is not None
    assert buf.room() == 2  # 8 fresh left; counting the draws left (12 x 3 - 4) / 3 would say 0
    for _ in range(2):  # every example drawn once
        assert buf.sample(4, 0) is not None
    assert buf.room() == 10  # nothing fresh: room for a whole max_ahead, although 24 draws are left
    for _ in range(6):  # the trainer goes on over them, twice more, while the producers work
        assert buf.sample(4, 0) is not None
    assert buf.room() == 10 and buf.sample(4, 0) is None
    buf.close()
