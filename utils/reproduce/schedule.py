"""Running independent rows side by side: one worker per device slot (a GPU, a group of GPUs for
torchrun, or one of several slots sharing a device), each taking the next row when its previous
one is done; no new row starts after a stop."""
import threading
from collections import deque


def device_slots(gpus, nproc, rows_per_gpu=1):
    """``CUDA_VISIBLE_DEVICES`` of each slot (one slot runs one row at a time): ``gpus`` ("0,1,2,3") in
    groups of ``nproc``, or ``(None,)`` (the default device) without ``gpus``; each slot repeated
    ``rows_per_gpu`` times, round robin ("0,1" with 2 rows per GPU: "0", "1", "0", "1"). With one process
    per row a GPU named twice in ``gpus`` is two slots on it ("0,0,0": three rows on GPU 0). Raises
    ValueError for an uneven split or a bad index."""
    if nproc < 1:
        raise ValueError("--nproc-per-row must be at least 1")
    if rows_per_gpu < 1:
        raise ValueError("--rows-per-gpu must be at least 1")
    if not gpus:
        return (None,) * rows_per_gpu
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    if not ids or any(not g.isdigit() for g in ids):
        raise ValueError(f"--gpus takes GPU indices separated by commas, e.g. 0,1,2,3; got {gpus!r}")
    if nproc > 1 and len(set(ids)) != len(ids):
        raise ValueError(f"--gpus {gpus} names a GPU twice, which only works with --nproc-per-row 1; give distinct "
                         f"indices and --rows-per-gpu K to run K rows on each group")
    if len(ids) % nproc:
        raise ValueError(f"--gpus {gpus} ({len(ids)} GPUs) cannot be split into groups of --nproc-per-row {nproc}")
    groups = [",".join(ids[i:i + nproc]) for i in range(0, len(ids), nproc)]
    return tuple(group for _ in range(rows_per_gpu) for group in groups)


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
