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
from checkpoint import save_checkpoint  # noqa: E402
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
    os.replace = lambda a, b: (moment(), real_replace(a, b))[1]          # 3


def child(argv, log, kind=None, at=None):
    """train.cli(argv) in a forked process -> its exit code, or -signal if a signal ended it."""
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1), os.dup2(fd, 2)
        code = 99
        try:
            if kind:
                inject(kind, at)
            train.cli(argv)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


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


def main(work):
    data, mae = os.path.join(work, "digits.csv.gz"), os.path.join(work, "mae.safetensors")
    write_standin(data)
    torch.manual_seed(0)
    cfg = MAEConfig(in_channels=1, base_channels=8, layers=(1, 1, 1, 1), num_classes=10)
    save_checkpoint(MAEResNet(cfg, with_heads=False), mae, kind="mae")
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

    running = {}                                        # two scenarios at a time: two cores
    for i, (kind, at) in enumerate(scenarios):
        if len(running) == 2:
            running.pop(os.wait()[0])
        pid = os.fork()
        if pid == 0:
            with open(os.path.join(work, f"run{i}.json"), "w") as f:
                json.dump(scenario(i, kind, at), f)
            os._exit(0)
        running[pid] = i
    while running:
        running.pop(os.wait()[0])
    for i in range(len(scenarios)):
        print(open(os.path.join(work, f"run{i}.json")).read(), flush=True)

if __name__ == "__main__":
    main(sys.argv[1])
