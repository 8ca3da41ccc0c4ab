"""`host_ring`: a loader actor's shared-memory slots for the host batches of the consumer-side GPU
stage. The consumer here is a real other process (spawned), which opens the actor's segments by
path, as a Train worker opens its loader actor's; both backends (memfd, /dev/shm)."""

from __future__ import annotations

import ast
import os
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from ray_extsrc.host_batch import HostBatch, PackedBytes, StackedArrays, pack_column, packed_size
from ray_extsrc.host_ring import HostRing, HostRingLost, RingRef, attach, discard, ring_slots
from ray_extsrc.types import SampleInfo

pytestmark = pytest.mark.timeout(60)

BACKENDS = ["memfd", "devshm"]


def _values(i: int, n: int = 5) -> tuple[list, list, tuple]:
    rng = np.random.default_rng(i)
    jpegs = [rng.integers(0, 255, 1000 + 7 * j, dtype=np.uint8) for j in range(n)]
    labels = [np.int64(j) for j in range(n)]
    return jpegs, labels, tuple(SampleInfo(j, j, i, 0) for j in range(n))


def _batch(i: int, n: int = 5, room: np.ndarray | None = None) -> HostBatch:
    """Batch i, its bytes packed into ``room`` (a `HostRing.reserve` view) if given."""
    jpegs, labels, infos = _values(i, n)
    return HostBatch(0, i, infos, {3: {0: pack_column(jpegs, room), 1: pack_column(labels)}})


def _reserved_batch(ring: HostRing, i: int) -> HostBatch:
    """Batch i packed as a loader actor's pipeline packs it: into room its ring reserved."""
    (room,) = ring.reserve([packed_size(_values(i)[0])])
    return _batch(i, room=room)


def _samples(batch: HostBatch) -> list[bytes]:
    return [bytes(x) for x in batch.columns[3][0].samples()]


# Another process (not forked: nothing inherited) that attaches a batch read from its stdin, prints
# its samples, and on "drop" lets go of the batch, on "die" is killed holding it.
_CONSUMER = """
import os, pickle, signal, sys
from ray_extsrc.host_ring import attach
batch = attach(pickle.load(sys.stdin.buffer))
print(repr([bytes(x) for x in batch.columns[3][0].samples()]), flush=True)
if sys.stdin.readline().strip() == "drop":
    del batch
    print("dropped", flush=True)
else:
    os.kill(os.getpid(), signal.SIGKILL)
"""


class _Consumer:
    def __init__(self, sent: HostBatch) -> None:
        self.p = subprocess.Popen([sys.executable, "-c", _CONSUMER], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.p.stdin.write(pickle.dumps(sent))
        self.p.stdin.flush()
        self.samples = ast.literal_eval(self.p.stdout.readline().decode())

    def then(self, command: str) -> str:
        out, _ = self.p.communicate(f"{command}\n".encode(), timeout=30)
        return out.decode().strip()


@pytest.mark.parametrize("backend", BACKENDS)
def test_another_process_reads_the_bytes_and_gives_the_slot_back(backend):
    ring = HostRing(2, backend=backend)
    try:
        want = _batch(1)
        sent = ring.place(want)
        ref = sent.columns[3][0]
        assert isinstance(ref, RingRef) and len(ref) == 5
        assert isinstance(sent.columns[3][1], StackedArrays)  # only packed bytes go to the ring
        payload = pickle.dumps(sent)
        assert len(payload) < 2000  # the bytes (5 kB) stay in the ring
        assert ring.held() == 1
        consumer = _Consumer(sent)
        assert consumer.samples == _samples(want)
        assert consumer.then("drop") == "dropped"
        assert ring.held() == 0 and ring.placed == 1 and ring.fallbacks == 0
    finally:
        ring.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_batch_packed_into_its_reserved_slot_is_sent_without_a_copy(backend):
    ring = HostRing(2, backend=backend)
    try:
        batch = _reserved_batch(ring, 1)
        assert ring.held() == 1 and ring.stats()["bytes"] >= packed_size(_values(1)[0])
        sent = ring.place(batch)
        ref = sent.columns[3][0]
        assert isinstance(ref, RingRef) and ref.slot == 0
        assert ring.packed_in_place == 1 and ring.placed == 1 and ring.fallbacks == 0
        del batch  # the actor lets go of its views: the slot stays the consumer's
        assert ring.held() == 1
        consumer = _Consumer(sent)
        assert consumer.samples == _samples(_batch(1))
        assert consumer.then("drop") == "dropped"
        assert ring.held() == 0
        # a batch packed elsewhere (no room was free when it was packed) is copied in by place()
        copied = attach(ring.place(_batch(2)))
        assert _samples(copied) == _samples(_batch(2)) and ring.packed_in_place == 1 and ring.placed == 2
    finally:
        ring.close()


def test_a_reserved_slot_comes_back_when_its_batch_is_dropped_unsent_and_only_then():
    ring = HostRing(1)
    try:
        rooms = ring.reserve([10, 5000])
        assert [len(r) for r in rooms] == [10, 5000] and all(r.flags.writeable for r in rooms)
        assert ring.reserve([1]) is None and ring.held() == 1  # no slot free: the pipeline packs elsewhere
        one = rooms[1][:3]
        del rooms
        assert ring.held() == 1  # a view of the room is left
        del one
        assert ring.held() == 0  # an epoch reset or an error dropped the batch unsent
        batch = _reserved_batch(ring, 1)
        kept = batch.columns[3][0].data  # the actor still holds a view of the batch it sent
        sent = ring.place(batch)
        del batch
        assert ring.held() == 1 and ring.reserve([1]) is None
        view = attach(sent)
        del sent, view  # the consumer mapped it and lets go: free
        assert ring.held() == 0
        new = _reserved_batch(ring, 3)  # the same slot, for another batch
        del kept  # the sent batch's last view goes now: the slot is batch 3's, not freed
        assert ring.held() == 1
        assert _samples(attach(ring.place(new))) == _samples(_batch(3)) and ring.packed_in_place == 2
    finally:
        ring.close()


def test_threads_reserving_at_once_get_rooms_of_their_own():
    ring = HostRing(8)
    try:
        with ThreadPoolExecutor(8) as pool:
            rooms = list(pool.map(lambda k: ring.reserve([4096])[0], range(8)))
            assert ring.reserve([1]) is None
        for k, room in enumerate(rooms):
            room[:] = k
        assert [int(room.min()) for room in rooms] == [int(room.max()) for room in rooms] == list(range(8))
        assert ring.held() == 8
        del room, rooms
        assert ring.held() == 0
    finally:
        ring.close()
    assert ring.reserve([1]) is None  # closed: the pipeline packs elsewhere


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_slot_is_given_back_when_the_last_view_goes(backend):
    ring = HostRing(1, backend=backend)
    try:
        got = attach(ring.place(_batch(1)))
        assert ring.held() == 1
        one = got.columns[3][0].samples()[2]  # a view of one sample outlives the batch
        expected = bytes(one)
        del got
        assert ring.held() == 1
        second = ring.place(_batch(2))  # no slot free: through the object store
        assert isinstance(second.columns[3][0], PackedBytes) and ring.fallbacks == 1
        assert bytes(one) == expected and not one.flags.writeable
        del one
        assert ring.held() == 0
        third = attach(ring.place(_batch(3)))  # the slot again, holding the new batch
        assert _samples(third) == _samples(_batch(3)) and ring.placed == 2
    finally:
        ring.close()


def test_a_consumer_that_died_holding_a_slot_loses_it_and_an_unused_batch_can_be_given_back():
    ring = HostRing(2)
    try:
        consumer = _Consumer(ring.place(_batch(1)))
        assert consumer.samples == _samples(_batch(1))
        consumer.then("die")
        unused = ring.place(_batch(2))
        assert ring.held() == 2
        discard(unused)  # a request the consumer dropped: back without being mapped
        assert ring.held() == 1
        a = ring.place(_batch(3))
        b = ring.place(_batch(4))  # no slot free but the dead consumer's: taken back
        assert isinstance(b.columns[3][0], RingRef) and ring.reclaimed == 1 and ring.fallbacks == 0
        assert _samples(attach(b)) == _samples(_batch(4)) and _samples(attach(a)) == _samples(_batch(3))
    finally:
        ring.close()


def test_a_reference_to_a_reused_slot_is_refused():
    ring = HostRing(1)
    try:
        first = ring.place(_batch(1))
        discard(first)
        ring.place(_batch(2))
        with pytest.raises(RuntimeError, match="slot 0 holds batch 2 .* not the batch 1"):
            attach(first)
        discard(first)  # stale: leaves the slot to the batch in it
        assert ring.held() == 1
    finally:
        ring.close()


_OWNER = """
import pickle, signal, sys
import numpy as np
from ray_extsrc.host_batch import HostBatch, pack_column
from ray_extsrc.host_ring import HostRing
ring = HostRing(1)
sys.stdout.buffer.write(pickle.dumps(ring.place(HostBatch(0, 0, (), {3: {0: pack_column([np.ones(9, np.uint8)])}}))))
sys.stdout.flush()
signal.pause()
"""


def test_a_batch_whose_actor_died_before_it_was_mapped_is_lost_with_a_clear_error():
    owner = subprocess.Popen([sys.executable, "-c", _OWNER], stdout=subprocess.PIPE)
    sent = pickle.load(owner.stdout)
    owner.kill()
    owner.wait(30)
    owner.stdout.close()
    with pytest.raises(HostRingLost, match="shared memory .* is gone"):
        attach(sent, "loader 'x'")
    discard(sent)  # nothing to give back: no error


def test_slots_cover_the_requests_in_flight_and_the_variable_turns_the_ring_off(monkeypatch):
    assert ring_slots(1) == 3 and ring_slots(4) == 6
    monkeypatch.setenv("RAY_EXTSRC_HOST_RING", "0")
    assert ring_slots(4) == 0


def test_a_batch_without_packed_bytes_and_a_growing_batch():
    ring = HostRing(1)
    try:
        plain = HostBatch(0, 0, (SampleInfo(0, 0, 0, 0),), {1: {0: pack_column([np.int64(3)])}})
        assert ring.place(plain) is plain and ring.held() == 0
        small = attach(ring.place(_batch(1, n=2)))
        assert _samples(small) == _samples(_batch(1, n=2))
        del small
        big = attach(ring.place(_batch(2, n=300)))  # the slot grows
        assert _samples(big) == _samples(_batch(2, n=300))
        assert ring.stats()["bytes"] >= sum(1000 + 7 * j for j in range(300))
    finally:
        ring.close()



_LOCKED_OUT = """
import os, sys
import numpy as np
from ray_extsrc.host_batch import HostBatch
from ray_extsrc.host_ring import RingRef, attach
from ray_extsrc.types import SampleInfo
os.setgid(65534)
os.setuid(65534)  # nobody: the slot (root's, mode 0600) is not ours to open
ref = RingRef(sys.argv[1], sys.argv[1], 0, 1, 0, np.array([0, 4], np.int64))
try:
    attach(HostBatch(0, 0, (SampleInfo(0, 0, 0, 0),), {3: {0: ref}}), "loader 'x'")
except PermissionError as e:
    print(e)
"""


def test_a_segment_this_process_may_not_open_says_how_to_do_without_the_ring(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root, to run the consumer as another user")
    slot = tmp_path / "slot"
    slot.write_bytes(b"\0" * 64)
    slot.chmod(0o600)
    tmp_path.chmod(0o755)
    out = subprocess.run([sys.executable, "-c", _LOCKED_OUT, str(slot)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "may not open its loader actor's shared memory" in out.stdout and "RAY_EXTSRC_HOST_RING=0" in out.stdout
