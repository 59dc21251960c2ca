"""Fault injection for tests/test_reliability.py: kill a tiny train.py run at every moment of
its checkpoint writes, then --resume it, and compare with a run that was never interrupted.

    python tests/kill_harness.py WORKDIR      # one JSON line per scenario on stdout

A scenario forks a child that continues a 2-step base run to step 7 (a checkpoint every step)
and is hit at moment `at` of its saves. The moments of one save, in order, are the steps of
checkpoint.save_checkpoint: 0 before the temp file's first byte, 1 the temp file half-written, 2
before its fsync, 3 before the rename over model.safetensors, 4 before the folder's fsync (the
rename done). The hit is SIGKILL, SIGINT, SIGTERM, SIGTERM twice, or ENOSPC (the writer raises
with the temp half-written, as a full disk does). Then a second child runs `train.py --resume
--steps 7` in the same folder. Forks, not fresh interpreters: one import of torch for ~70 runs,
two scenarios at a time. torch runs one thread and the parent does no tensor work, so forking
is safe.

    python tests/kill_harness.py WORKDIR folder   # the run folder's moments (issue 30)

SIGKILL before every call of: an --overwrite run replacing a complete one (its log writes before
the first save, its saves, the folder swap, the old run's removal); the --resume rewrite of
log.jsonl; EMA snapshot writes; sample.py --num-samples' parts and output. After each kill the
folder must hold the previous complete run or the new one (never neither, never a mixture),
and a rerun must finish it.
"""
import errno
import json
import os
import shutil
import signal
import sys

import torch

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import matplotlib  # noqa: E402  (imported before the forks: each child would pay for it)

matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: E402,F401
import torch._dynamo  # noqa: E402,F401  (torch.optim imports it on first use: 1.5 s a child)
import safetensors.torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402  (numpy: no torch work in the parent)

import train  # noqa: E402
from encoder import MAEConfig, MAEResNet  # noqa: E402
from checkpoint import read_train_state, save_checkpoint  # noqa: E402
from test_train_mae import write_standin  # noqa: E402

BASE, END, PER_SAVE = 2, 7, 5          # base run's step, target step, moments per save


def inject(kind, at):
    """Patch the writer's steps (safetensors' save_file, os.fsync, os.replace) so that moment
    number `at`, counted over every save of the run, delivers `kind`."""
    count = [0]
    real_save, real_fsync, real_replace = safetensors.torch.save_file, os.fsync, os.replace

    def moment():
        if count[0] == at:
            if kind == "ENOSPC":
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            sig = signal.SIGTERM if kind == "2xSIGTERM" else getattr(signal, kind)
            os.kill(os.getpid(), sig)                   # SIGKILL: the process ends right here
            if kind == "2xSIGTERM":
                os.kill(os.getpid(), sig)               # the second: stop at once
        count[0] += 1

    def save_file(tensors, path, metadata=None):
        moment()                                        # 0: nothing written yet
        real_save(tensors, path, metadata=metadata)
        if count[0] == at and kind in ("SIGKILL", "ENOSPC"):
            os.truncate(path, os.path.getsize(path) // 2)   # 1: what a kill mid-write leaves
        moment()

    safetensors.torch.save_file = save_file
    os.fsync = lambda fd: (moment(), real_fsync(fd))[1]                  # 2 (file), 4 (folder)
    os.replace = lambda a, b: (str(a).endswith(".safetensors.tmp") and moment(),  # 3 (the
                               real_replace(a, b))[1]           # checkpoint's rename, no other)


def child(argv, log, kind=None, at=None):
    """train.cli(argv) in a forked process -> its exit code, or -signal if a signal ended it."""
    return forked(lambda: train.cli(argv), log, (lambda: inject(kind, at)) if kind else None)


def forked(fn, log, setup=None):
    """fn() in a forked process (after setup(): the fault's patches) -> its exit code, or
    -signal if a signal ended it."""
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1), os.dup2(fd, 2)
        code = 99
        try:
            if setup:
                setup()
            fn()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def two_at_a_time(work, jobs):
    """[(fn, arg)] -> [fn(arg)], each in a forked process, two at a time (two cores); the
    results (JSON-able dicts) pass through files in work."""
    running = {}
    for i, (fn, arg) in enumerate(jobs):
        if len(running) == 2:
            running.pop(os.wait()[0])
        pid = os.fork()
        if pid == 0:
            with open(os.path.join(work, f"job{i}.json"), "w") as f:
                json.dump(fn(arg), f)
            os._exit(0)
        running[pid] = i
    while running:
        running.pop(os.wait()[0])
    return [json.load(open(os.path.join(work, f"job{i}.json"))) for i in range(len(jobs))]


def on_disk(run):
    """(step of the checkpoint in `run`, a temp file left?)."""
    with safe_open(os.path.join(run, "model.safetensors"), "np") as f:
        step = int(f.metadata()["step"])
    return step, os.path.exists(os.path.join(run, "model.safetensors.tmp"))


def final(run):
    """Every tensor (weights, EMA, optimizer, RNG states) and the logged history."""
    path = os.path.join(run, "model.safetensors")
    with safe_open(path, "np") as f:
        history = json.loads(f.metadata()["train"])
    return load_file(path), history


def stand_ins(work):
    """The 30-digit stand-in data and a random 8-channel MAE in work -> their paths."""
    data, mae = os.path.join(work, "digits.csv.gz"), os.path.join(work, "mae.safetensors")
    write_standin(data)
    torch.manual_seed(0)
    cfg = MAEConfig(in_channels=1, base_channels=8, layers=(1, 1, 1, 1), num_classes=10)
    save_checkpoint(MAEResNet(cfg, with_heads=False), mae, kind="mae")
    return data, mae


def main(work):
    data, mae = stand_ins(work)
    base = os.path.join(work, "base")
    first = ["--model", "S4", "--data-path", data, "--mae-ckpt", mae, "--out", base,
             "--n-classes-per-step", "2", "--gen-per-label", "4", "--n-pos", "3", "--n-unc",
             "2", "--warmup", "1", "--lr", "1e-3", "--log-every", "1", "--ckpt-every", "1",
             "--sample-every", "0", "--device", "cpu", "--eval-every", "0", "--snapshot-every", "0",
             "--steps", str(BASE)]
    assert child(first, os.path.join(work, "base.log")) == 0, open(work + "/base.log").read()
    resume = lambda run: ["--resume", "--out", run, "--steps", str(END)]   # recorded flags
    ref = os.path.join(work, "ref")
    shutil.copytree(base, ref)
    assert child(resume(ref), os.path.join(work, "ref.log")) == 0, open(work + "/ref.log").read()
    want_tensors, want_history = final(ref)

    saves = END - BASE                                  # checkpoints at steps 3 .. 7
    scenarios = [("SIGKILL", at) for at in range((saves - 1) * PER_SAVE + PER_SAVE - 1)]
    scenarios += [(k, at) for k in ("SIGINT", "SIGTERM") for at in (2, 8, 14)]
    scenarios += [("2xSIGTERM", 3), ("2xSIGTERM", 11), ("ENOSPC", 1), ("ENOSPC", 6)]
    def scenario(i, kind, at):
        run, log = os.path.join(work, f"run{i}"), os.path.join(work, f"run{i}.log")
        shutil.copytree(base, run)
        code = child(resume(run), log, kind, at)
        step, tmp = on_disk(run)
        message = open(log).read()[-2000:]
        save, moment = divmod(at, PER_SAVE)
        again = child(resume(run), log + ".resume")
        tensors, history = final(run)
        same = tensors.keys() == want_tensors.keys() and all(
            (tensors[k] == want_tensors[k]).all() for k in tensors) and history == want_history
        row = dict(kind=kind, at=at, save_step=BASE + 1 + save, moment=moment, code=code,
                   step=step, tmp_left=tmp, message=message, resume_code=again,
                   resume_tmp_left=on_disk(run)[1], bitwise_equal=bool(same))
        shutil.rmtree(run)
        return row

    for row in two_at_a_time(work, [(lambda a: scenario(*a), (i, *ka))
                                    for i, ka in enumerate(scenarios)]):
        print(json.dumps(row), flush=True)


# ------------------------------------------------------------------------------------------
# The run folder's moments (issue 30)
# ------------------------------------------------------------------------------------------
def aim(at, targets):
    """SIGKILL at moment `at`, counted over calls of targets [(module, name, filter)]: the
    moment before each call (filter(args) False: not counted). The moment after a call is the
    one before the next, but for the last call, which the run's end covers."""
    count = [0]

    def moment():
        if count[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        count[0] += 1

    for module, name, keep in targets:
        real = getattr(module, name)

        def wrapped(*a, real=real, keep=keep, **kw):
            if keep(a):
                moment()
            return real(*a, **kw)
        setattr(module, name, wrapped)


def tree(run):
    return {os.path.relpath(os.path.join(d, f), run): open(os.path.join(d, f), "rb").read()
            for d, _, names in os.walk(run) for f in names} if os.path.isdir(run) else None


def rows(run):
    """log.jsonl's rows without the timing columns (they differ between runs)."""
    with open(os.path.join(run, "log.jsonl")) as f:
        return [{k: v for k, v in json.loads(r).items() if k not in ("img_s", "gb")} for r in f]


def folder_main(work):
    import numpy as np
    import checkpoint
    import sample
    data, mae = stand_ins(work)
    args = lambda out, *extra: [
        "--model", "S4", "--data-path", data, "--mae-ckpt", mae, "--out", out,
        "--n-classes-per-step", "2", "--gen-per-label", "4", "--n-pos", "3", "--n-unc", "2",
        "--warmup", "1", "--log-every", "1", "--ckpt-every", "1", "--device", "cpu",
        "--eval-every", "0", *extra]
    a, ref = os.path.join(work, "a"), os.path.join(work, "ref")
    assert forked(lambda: train.cli(args(a, "--steps", "2", "--lr", "1e-3", "--snapshot-every",
                                         "1", "--sample-every", "1")), a + ".log") == 0
    shutil.copytree(a, ref)
    assert forked(lambda: train.cli(["--resume", "--out", ref, "--steps", "4"]),
                  ref + ".log") == 0
    a_tree, ref_rows = tree(a), rows(ref)
    everything = [(safetensors.torch, "save_file", lambda x: True),
                  (os, "fsync", lambda x: True), (os, "replace", lambda x: True),
                  (shutil, "rmtree", lambda x: True), (train, "write_log", lambda x: True)]
    aside = lambda x: "snapshots" in str(x[1] if len(x) > 1 else x[0]) or str(x[-1]).endswith(
        "log.jsonl")                    # the snapshot writes and the log.jsonl rewrite only
    b_args = lambda run: args(run, "--steps", "1", "--lr", "2e-3", "--snapshot-every", "0",
                              "--sample-every", "0", "--overwrite")

    def is_b(run):      # a complete new run: B's checkpoint, nothing of A's left in the folder
        with safe_open(os.path.join(run, "model.safetensors"), "np") as f:
            meta = f.metadata()
        files = tree(run)
        return (json.loads(meta["args"])["lr"] == 2e-3 and not any(  # no file of A's left
            files.get(f) == body for f, body in a_tree.items() if not f.endswith(".png")))
        # (a picture may match A's: both runs' first EMA samples are the zero-init gray)

    def overwrite(at):                  # an --overwrite run replacing A, killed at `at`
        run = os.path.join(work, f"ow{at}")
        shutil.copytree(a, run)
        code = forked(lambda: train.cli(b_args(run)), run + ".log", lambda: aim(at, everything))
        state = "old" if tree(run) == a_tree else "new" if tree(run) and is_b(run) else "BAD"
        again = forked(lambda: train.cli(b_args(run)), run + ".again.log")
        left = sorted(f for f in os.listdir(work) if f.startswith(f"ow{at}.") and
                      f.endswith((".next", ".old")))
        return dict(case="overwrite", at=at, code=code, state=state, again=again, left=left,
                    final_new=is_b(run) and read_train_state(run)["step"] == 1)

    def resume(at):                     # --resume 2 -> 4: the log rewrite and the snapshots
        run = os.path.join(work, f"rs{at}")
        shutil.copytree(a, run)
        code = forked(lambda: train.cli(["--resume", "--out", run, "--steps", "4"]),
                      run + ".log", lambda: aim(at, [(safetensors.torch, "save_file", aside),
                                                     (os, "replace", aside)]))
        snaps = sorted(os.listdir(os.path.join(run, "snapshots")))
        whole = all(checkpoint.read_checkpoint(os.path.join(run, "snapshots", s), "gen")
                    for s in snaps if s.endswith(".safetensors"))
        first = rows(run)
        again = 0 if read_train_state(run)["step"] == 4 else forked(
            lambda: train.cli(["--resume", "--out", run, "--steps", "4"]), run + ".again.log")
        same = rows(run) == ref_rows and all(       # the snapshots' tensors, bitwise
            (load_file(os.path.join(run, "snapshots", f"ema_000000{s}.safetensors"))[n] ==
             t).all() for s in (3, 4) for n, t in load_file(os.path.join(
                 ref, "snapshots", f"ema_000000{s}.safetensors")).items())
        return dict(case="resume", at=at, code=code, log_rows=len(first), snapshots_whole=whole,
                    log_prefix=first == ref_rows[:len(first)], again=again, final_same=same)

    def sampled(at):                    # sample.py --num-samples: its parts and its .npz
        d = os.path.join(work, f"sm{at}")
        os.makedirs(d)
        npz = os.path.join(d, "s.npz")
        argv = ["--ckpt", a, "--num-samples", "20", "--out", npz, "--batch", "10"]
        code = forked(lambda: sample.main(argv), d + ".log", lambda: aim(at, [
            (np, "save", lambda x: True), (os, "replace", lambda x: True),
            (shutil, "rmtree", lambda x: True)]))
        visible = sorted(f for f in os.listdir(d) if not f.startswith("."))
        ok = visible == [] or (visible == ["s.npz"] and np.load(npz)["arr_0"].shape[0] == 20)
        again = forked(lambda: sample.main(argv + ["--overwrite"]), d + ".again.log")
        return dict(case="sample", at=at, code=code, visible=visible, whole_or_absent=ok,
                    again=again, final=sorted(os.listdir(d)))

    # moments, before each call: an --overwrite of 1 step (its new log.jsonl, log row, save
    # in 4 calls, the swap's fsync, the old run's removal: 8), the --resume's log rewrite and
    # two snapshot saves (5), sample.py's stale-parts removal, part, rename, cleanup (4); one
    # more each, where the run ends unhurt (code 0: every moment was reached)
    scenarios = ([(overwrite, at) for at in range(9)] + [(resume, at) for at in range(6)]
                 + [(sampled, at) for at in range(5)])
    for row in two_at_a_time(work, scenarios):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    folder_main(sys.argv[1]) if sys.argv[2:] == ["folder"] else main(sys.argv[1])
