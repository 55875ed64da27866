"""A job worker's identity outlives its process on one data dir; live workers never share one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from twolane.services.worker_slot import COMPACT_AFTER_LINES, HeldMessage, WorkerSlot


def test_a_second_live_worker_gets_an_identity_of_its_own(tmp_path: Path) -> None:
    first = WorkerSlot.acquire(tmp_path)
    second = WorkerSlot.acquire(tmp_path)
    assert first.worker_id != second.worker_id
    first.close()
    second.close()


def test_the_next_worker_on_a_slot_takes_its_identity_and_what_it_held(tmp_path: Path) -> None:
    slot = WorkerSlot.acquire(tmp_path)
    assert slot.take_previous() == []
    slot.hold("$JS.ACK.a", "job-a")
    slot.hold("$JS.ACK.b", "job-b")
    slot.hold("$JS.ACK.c", "")
    slot.release("$JS.ACK.b")
    worker_id = slot.worker_id
    slot.close()

    again = WorkerSlot.acquire(tmp_path)
    assert again.worker_id == worker_id
    assert again.take_previous() == [
        HeldMessage("$JS.ACK.a", "job-a"),
        HeldMessage("$JS.ACK.c", ""),
    ]
    assert again.take_previous() == []  # given back once
    again.close()


def test_a_killed_worker_leaves_its_slot_and_its_record(tmp_path: Path) -> None:
    code = (
        "import os, sys; from pathlib import Path;"
        "from twolane.services.worker_slot import WorkerSlot;"
        "slot = WorkerSlot.acquire(Path(sys.argv[1])); slot.take_previous();"
        "slot.hold('$JS.ACK.x', 'job-x'); print(slot.worker_id, flush=True);"
        "os.kill(os.getpid(), 9)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True
    )
    slot = WorkerSlot.acquire(tmp_path)
    assert slot.worker_id == out.stdout.strip()
    assert slot.take_previous() == [HeldMessage("$JS.ACK.x", "job-x")]
    slot.close()


def test_the_record_is_compacted_as_it_grows(tmp_path: Path) -> None:
    slot = WorkerSlot.acquire(tmp_path)
    slot.take_previous()
    for i in range(3 * COMPACT_AFTER_LINES):
        slot.hold(f"$JS.ACK.{i}", f"job-{i}")
        slot.release(f"$JS.ACK.{i}")
    slot.hold("$JS.ACK.last", "job-last")
    slot.close()
    held_file = next((tmp_path / "job-workers").glob("*.held"))
    assert len(held_file.read_text().splitlines()) <= COMPACT_AFTER_LINES + 1
    again = WorkerSlot.acquire(tmp_path)
    assert again.take_previous() == [HeldMessage("$JS.ACK.last", "job-last")]
    again.close()
