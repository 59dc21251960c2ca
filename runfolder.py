"""
The run folder: one run per --out, whole. A lock keeps a second process out, --overwrite
replaces the old run as a unit (the new one writes to OUT.next until its first checkpoint,
then takes OUT's place in one rename), --resume continues it with its log rewritten through
a temp file. A kill at any moment leaves the previous complete run or the new one, never
neither (tests/test_runfolder.py kills it at each moment). The checkpoint file itself is
checkpoint.py's.
"""
import ctypes
import fcntl
import json
import os
import shutil

from checkpoint import fsync_folder, write_atomic

LOCKS = {}      # this process's run-folder locks: a rerun in the same process takes its own over


def claim_run_folder(out, resume, overwrite):
    """Rank 0, before any work: the lock on OUT (fcntl.flock of .OUT.lock beside it: the kernel
    drops it when the process ends, so a killed run leaves no stuck lock); an interrupted
    replacement undone or finished; the refusals (a run in OUT without --resume or
    --overwrite, one stopped before its first checkpoint). -> the folder this run writes until
    its first checkpoint: OUT, or OUT.next when --overwrite replaces a run."""
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if out in LOCKS:
        LOCKS.pop(out).close()
    path = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.lock")
    lock = open(path, "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ValueError(f"--out {out}: another process is running in this folder ({path} is "
                         f"locked); wait for it to end, or pass another --out") from None
    LOCKS[out] = lock
    if os.path.isdir(out + ".old"):                     # a replacement killed half-way:
        if os.path.isdir(out):
            shutil.rmtree(out + ".old")                 # the new run had taken OUT's place
        else:
            os.replace(out + ".old", out)               # the old run goes back
    if os.path.isdir(out + ".next"):
        shutil.rmtree(out + ".next")                    # a replacement that never saved
    has = lambda f: os.path.exists(os.path.join(out, f))
    if not resume and not overwrite and has("model.safetensors"):
        raise ValueError(f"--out {out} holds another run; pass --resume to continue it, "
                         f"--overwrite to replace it, or a new --out")
    if not resume and not overwrite and has("log.txt"):
        raise ValueError(f"--out {out} holds a run stopped before its first checkpoint (log.txt, "
                         f"no model.safetensors): nothing to resume; pass --overwrite to start "
                         f"it again, or a new --out")
    if overwrite and not resume and any(map(has, ("model.safetensors", "log.txt", "snapshots"))):
        print(f"--overwrite: the new run writes to {out}.next until its first checkpoint, then "
              f"replaces {out} whole (until then {out} holds the old run)")
        return out + ".next"
    return out


def replace_run(new, out):
    """--overwrite's commit, right after the new run's first checkpoint: its folder takes
    OUT's place in one step (renameat2 RENAME_EXCHANGE), then the old run is deleted. Where
    the file system cannot exchange: OUT -> OUT.old, new -> OUT (a kill in between leaves
    OUT.old, which claim_run_folder puts back). -> OUT."""
    out, old = os.path.abspath(out), os.path.abspath(new)
    libc = ctypes.CDLL(None, use_errno=True)
    exchanged = hasattr(libc, "renameat2") and libc.renameat2(
        -100, os.fsencode(new), -100, os.fsencode(out), 2) == 0     # AT_FDCWD, RENAME_EXCHANGE
    if not exchanged:
        old = out + ".old"
        os.replace(out, old)
        os.replace(new, out)
    fsync_folder(os.path.dirname(out))                  # the new name is durable ...
    shutil.rmtree(old)                                  # ... before the old run goes
    return out


def prepare_run_folder(out, resume, start, snapshots):
    """Rank 0, once every input has been checked: the folder made, a save killed half-way
    cleaned up, a fresh log; resuming, the log.jsonl rows after the checkpoint's step dropped
    (those steps rerun), rewritten through a temp file: a kill leaves the old rows or the new.
    A torn last row (a full disk or a kill mid-write) is dropped with a note."""
    ckpt, log, jsonl = (os.path.join(out, f) for f in ("model.safetensors", "log.txt",
                                                          "log.jsonl"))
    os.makedirs(out, exist_ok=True)
    if os.path.exists(ckpt + ".tmp"):
        os.remove(ckpt + ".tmp")                                # a save killed half-way
    if snapshots:
        os.makedirs(os.path.join(out, "snapshots"), exist_ok=True)
    if not resume:
        open(log, "w").close()                                  # a fresh run, a fresh log
    lines = open(jsonl).read().splitlines() if resume and os.path.exists(jsonl) else []
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise ValueError(f"{jsonl}: line {i + 1} is not JSON ({line[:40]!r}); fix or "
                                 f"delete that line, then --resume again") from None
            print(f"NOTE: {jsonl}: its last line was cut off (a full disk or a kill while it "
                  f"was written); dropped, the step reruns")

    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows if r["step"] <= start)
    write_atomic(jsonl, write)
