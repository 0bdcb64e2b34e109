"""Running independent rows side by side: one worker per device slot (a GPU, or a group of GPUs for
torchrun), each taking the next row when its previous one is done; no new row starts after a stop."""
import threading
from collections import deque


def device_slots(gpus, nproc):
    """``CUDA_VISIBLE_DEVICES`` of each slot: ``gpus`` ("0,1,2,3") in groups of ``nproc``, or ``(None,)``
    (one slot, the default device) without ``gpus``. Raises ValueError for an uneven split."""
    if nproc < 1:
        raise ValueError("--nproc-per-row must be at least 1")
    if not gpus:
        return (None,)
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    if not ids or any(not g.isdigit() for g in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"--gpus takes distinct GPU indices separated by commas, e.g. 0,1,2,3; got {gpus!r}")
    if len(ids) % nproc:
        raise ValueError(f"--gpus {gpus} ({len(ids)} GPUs) cannot be split into groups of --nproc-per-row {nproc}")
    return tuple(",".join(ids[i:i + nproc]) for i in range(0, len(ids), nproc))


def run_concurrently(items, slots, work, stop, poll=0.2):
    """Call ``work(item, slot)`` for every item, each slot running one item at a time, in order of
    ``items``; after ``stop`` (a threading.Event) is set no new item starts. The calling thread only
    waits (in short joins, so it keeps handling signals). Returns the items that never started."""
    queue = deque(items)
    lock = threading.Lock()

    def worker(slot):
        while not stop.is_set():
            with lock:
                if not queue:
                    return
                item = queue.popleft()
            work(item, slot)

    threads = [threading.Thread(target=worker, args=(slot,), daemon=True) for slot in slots]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(poll)
    return list(queue)
