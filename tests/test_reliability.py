"""Nothing lost (issue 16): the checkpoint is one unit, killed or full-disk saves keep the last
complete one and --resume continues bitwise; bad inputs are refused before any work, with a
message naming the input, and nothing written or replaced. Runs: the S4 generator on a
30-digit stand-in with a random 8-channel MAE, or the MNIST MAE (seconds each)."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import train
from encoder import MAEConfig, MAEResNet
from checkpoint import (metadata_sha256, read_checkpoint, read_train_state, save_checkpoint,
                        tensor_sha256)
from test_train_mae import write_standin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("rel")
    write_standin(str(d / "digits.csv.gz"))
    torch.manual_seed(0)
    cfg = MAEConfig(in_channels=1, base_channels=8, layers=(1, 1, 1, 1), num_classes=10)
    save_checkpoint(MAEResNet(cfg, with_heads=False), str(d / "mae.safetensors"), kind="mae")
    return d


def gen_args(files, out, *extra):
    return ["--model", "S4", "--data-path", str(files / "digits.csv.gz"), "--mae-ckpt",
            str(files / "mae.safetensors"), "--out", str(out), "--n-classes-per-step", "2",
            "--gen-per-label", "4", "--n-pos", "3", "--n-unc", "2", "--warmup", "1", "--lr",
            "1e-3", "--log-every", "1", "--sample-every", "0", "--device", "cpu",
            "--eval-every", "0", "--snapshot-every", "0", *map(str, extra)]


def snapshot(run):
    """Every file of a run folder -> its bytes: "nothing replaced" is this staying equal."""
    return {f: open(os.path.join(run, f), "rb").read() for f in sorted(os.listdir(run))}


@pytest.fixture(scope="module")
def run2(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("run2")
    train.main(gen_args(files, out, "--steps", 2))
    return out


def refused(capsys, call, *said):
    """call() ends in an error whose message holds every string of `said`."""
    with pytest.raises((SystemExit, ValueError, FileNotFoundError, FloatingPointError)) as e:
        call()
    text = capsys.readouterr().err + (str(e.value) if not isinstance(e.value, SystemExit) else "")
    for s in said:
        assert s in text, (s, text[-800:])


# ------------------------------------------------------------------------------------------
# Defect 1: kills and a full disk during the checkpoint writes
# ------------------------------------------------------------------------------------------
def test_kills_and_full_disk_at_every_moment_of_the_saves_resume_bitwise(tmp_path):
    """tests/kill_harness.py: 34 forked runs, each hit once during its saves (24 SIGKILL
    moments over 5 saves, SIGINT and SIGTERM 3 each, SIGTERM twice 2, ENOSPC mid-write 2). After
    every hit model.safetensors holds the last COMPLETE checkpoint (a kill before the rename:
    the previous step; after it: the new one; a signal: the step after the one being saved,
    as the step ends first), --resume works, and the resumed run ends bitwise equal (weights,
    EMA, optimizer, RNG, history) to a run that was never interrupted."""
    res = subprocess.run([sys.executable, "tests/kill_harness.py", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(rows) == 34 and len({(r["save_step"], r["moment"]) for r in rows
                                    if r["kind"] == "SIGKILL"}) == 24
    for r in rows:
        prev, cur = r["save_step"] - 1, r["save_step"]
        want = {"SIGKILL": (-9, cur if r["moment"] == 4 else prev),
                "2xSIGTERM": (-15, cur if r["moment"] == 4 else prev),
                "SIGINT": (130, cur + 1), "SIGTERM": (143, cur + 1),
                "ENOSPC": (1, prev)}[r["kind"]]
        assert (r["code"], r["step"]) == want, r
        assert r["resume_code"] == 0 and not r["resume_tmp_left"] and r["bitwise_equal"], r
        if r["kind"] == "ENOSPC":
            assert "could not write the checkpoint" in r["message"] and not r["tmp_left"], r
        if r["kind"] in ("SIGINT", "SIGTERM"):
            assert "Continue with: python train.py --resume --out" in r["message"], r


def test_flipped_bit_and_nan_are_named_not_loaded(run2, tmp_path, capsys):
    """A flipped bit in a tensor's bytes fails its recorded sha256, and a NaN (in a file whose
    digests, the metadata's included, were recomputed, as a writer without the check would
    leave it) is refused: both name the tensor, for --resume as for sampling."""
    bad = tmp_path / "bad"
    shutil.copytree(run2, bad)
    path = bad / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0x10                                   # the last tensor's bytes, in place
    path.write_bytes(bytes(raw))
    refused(capsys, lambda: train.main(["--resume", "--out", str(bad), "--steps", "3"]),
            "tensor '", "does not match its recorded sha256")
    with pytest.raises(ValueError, match="does not match its recorded sha256"):
        read_checkpoint(str(bad), "gen", ema=None)
    name = "ema/final.linear.weight"
    t[name] = t[name].clone()
    t[name][0, 0] = float("nan")
    sums = json.loads(meta["sha256"])
    sums[name] = tensor_sha256(t[name])
    forged = dict(meta, sha256=json.dumps(sums))
    save_file(t, str(path), dict(forged, meta_sha256=metadata_sha256(forged)))
    with pytest.raises(ValueError, match=f"tensor '{name}' holds NaN"):
        read_checkpoint(str(bad), "gen")                # the EMA: what sample.py loads
    refused(capsys, lambda: train.main(["--resume", "--out", str(bad), "--steps", "3"]),
            f"tensor '{name}' holds NaN")


# ------------------------------------------------------------------------------------------
# Defects 2-10, one test each: the message, and nothing written or replaced
# ------------------------------------------------------------------------------------------
def test_2_another_run_in_out_is_refused_unless_overwrite(files, run2, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run2, run)
    before = snapshot(run)
    refused(capsys, lambda: train.main(gen_args(files, run, "--steps", 3)),
            "holds another run", "--resume", "--overwrite")
    refused(capsys, lambda: train.main(["--stage", "mae", "--out", str(run), "--steps", "1"]),
            "holds another run")                        # another stage's run as well
    assert snapshot(run) == before
    train.main(gen_args(files, run, "--steps", 1, "--overwrite"))
    assert read_train_state(str(run))["step"] == 1 and len(read_train_state(str(run))[
        "history"]) == 1


def test_3_weights_that_cannot_train_are_never_checkpointed(files, tmp_path, capsys):
    """--lr 1e30: the step-1 update leaves finite weights of ~1e30 whose next loss is NaN.
    The save of step 2 checks the updated weights' loss on the step's batch, stops, and keeps
    the step-1 checkpoint, which resumes with a lower lr (--change-args) to finite weights."""
    run = tmp_path / "run"
    train.main(gen_args(files, run, "--steps", 1, "--ckpt-every", 1))
    good = load_file(str(run / "model.safetensors"))
    with pytest.raises(FloatingPointError, match="after the update of step 2") as e:
        train.main(gen_args(files, run, "--resume", "--steps", 3, "--lr", "1e30", "--warmup",
                            "0", "--change-args"))
    assert "(step 1), is untouched" in str(e.value) and "--change-args" in str(e.value)
    kept = load_file(str(run / "model.safetensors"))
    assert all(torch.equal(good[k], kept[k]) for k in good)
    train.main(gen_args(files, run, "--resume", "--steps", 3, "--lr", "1e-4", "--change-args"))
    assert all(v.isfinite().all() for v in load_file(str(run / "model.safetensors")).values())


def test_4_resume_takes_the_recorded_flags(files, run2, tmp_path, capsys):
    """`--resume --out RUN --steps N` alone continues RUN with ITS flags (not the S4 recipe's
    lr/group sizes), bitwise as if typed; a schedule flag may change, with a NOTE."""
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(run2, a), shutil.copytree(run2, b)
    train.main(["--resume", "--out", str(a), "--steps", "3"])
    train.main(gen_args(files, b, "--resume", "--steps", 3, "--log-every", 2))
    assert "NOTE: resuming" in capsys.readouterr().out
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    with safe_open(str(a / "model.safetensors"), "pt") as f:
        args = json.loads(f.metadata()["args"])
    assert (args["lr"], args["n_pos"], args["gen_per_label"]) == (1e-3, 3, 4)   # not S4's


def test_5_labels_beyond_the_class_count_are_refused_before_work(tmp_path, capsys):
    data = tmp_path / "eleven.csv.gz"
    rows = write_standin(str(data))
    rows[-1, -1] = 10                                   # an 11th class
    import gzip
    with gzip.open(data, "wt") as f:
        f.write("\n".join(",".join(map(str, r)) for r in rows) + "\n")
    out = tmp_path / "run"
    refused(capsys, lambda: train.main(["--stage", "mae", "--data-path", str(data), "--out",
                                        str(out), "--batch", "8", "--device", "cpu"]),
            "11 classes", "10 classes")
    assert not out.exists()


def test_6_no_false_success(files, run2, tmp_path, capsys):
    """--steps -1 and a --resume --steps at or below the saved step are refused (no "wrote")."""
    out = tmp_path / "run"
    refused(capsys, lambda: train.main(["--stage", "mae", "--out", str(out), "--steps", "-1"]),
            "--steps -1: must be > 0")
    refused(capsys, lambda: train.main(["--resume", "--out", str(run2), "--steps", "1"]),
            "already at step 2", "larger --steps")
    assert not out.exists() and "wrote" not in capsys.readouterr().out


def two_ranks_under_way(files, out, *extra):
    """Two gloo ranks of a long train.py run (plain python with torchrun's variables), started
    and training (two log lines written) -> their Popen objects, stderr piped."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "train.py", *gen_args(files, out, "--steps", 100000, "--ckpt-every",
                                                 100000, *extra)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r),
                                                  WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                                  MASTER_PORT=str(port), OMP_NUM_THREADS="1"))
             for r in (0, 1)]
    log = out / "log.txt"
    for _ in range(600):                                # wait for training to be under way
        if log.exists() and log.read_text().count("\n") >= 2:
            break
        time.sleep(0.1)
    return procs


def test_7_a_frozen_ddp_peer_ends_the_job_with_a_message(files, tmp_path):
    """Two gloo ranks; rank 1 is frozen (SIGSTOP) mid-run: rank 0 gives up after
    --ddp-timeout (0.1 min) with a message and exit 1, instead of hanging forever."""
    procs = two_ranks_under_way(files, tmp_path / "run", "--ddp-timeout", 0.1)
    try:
        procs[1].send_signal(signal.SIGSTOP)
        t0 = time.time()
        err = procs[0].communicate(timeout=120)[1]
        assert procs[0].returncode == 1 and time.time() - t0 < 60
        assert "--ddp-timeout" in err and "Traceback" not in err, err[-2000:]
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_8_an_mae_batch_larger_than_the_data_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    refused(capsys, lambda: train.main(["--stage", "mae", "--out", str(out), "--batch", "8192",
                                        "--device", "cpu"]), "--batch 8192", "4500 training")
    assert not out.exists()


def test_9_messages_not_tracebacks_once_under_torchrun(files, tmp_path):
    """torchrun, 2 ranks, a bad flag: the error once (rank 0), exit 1; plain python: a missing
    MAE says how to train it, a bad value is one line, and no run folder is left behind."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={port}", "train.py", *gen_args(files, out, "--steps",
                                                                          0)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and res.stderr.count("--steps 0: must be > 0") == 1, res.stderr
    res = subprocess.run([sys.executable, "train.py", "--out", str(out), "--mae-ckpt",
                          str(tmp_path / "nope")], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert "train it first with `python train.py --stage mae" in res.stderr
    assert not out.exists()


def test_10_every_count_and_interval_is_checked_by_name(files, tmp_path, capsys):
    out = tmp_path / "run"
    for flag, value in (("--batch", 0), ("--ckpt-every", 0), ("--log-every", 0),
                        ("--holdout", 0), ("--warmup", -1), ("--ddp-timeout", 0)):
        refused(capsys, lambda: train.main(["--stage", "mae", "--out", str(out), flag,
                                            str(value)]), f"{flag} {value}", "must be")
    refused(capsys, lambda: train.main(gen_args(files, out, "--n-pos", 0)), "--n-pos 0")
    if not torch.cuda.is_available():
        refused(capsys, lambda: train.main(gen_args(files, out, "--device", "cuda")),
                "--device cuda", "sees no CUDA")
    bad = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(1)}, str(bad), {"kind": "gen", "config": "{not json"})
    refused(capsys, lambda: read_checkpoint(str(bad), "gen"), str(bad), "not a readable")
    assert not out.exists()
