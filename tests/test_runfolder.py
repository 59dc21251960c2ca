"""Nothing lost, part 2: the run folder as a whole (issue 30). A folder holds the previous
complete run or the new one, never neither and never a mixture; one test per defect found
(numbered as in the issue), each asserting the message (naming the flag or file) and that
nothing was written or replaced. Runs: the S4 generator on a 30-digit stand-in with a random
8-channel MAE (seconds each); the kill scenarios are in tests/kill_harness.py (`folder`)."""
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import cache
import checkpoint
import data
import sample
import train
from checkpoint import metadata_sha256, read_train_state, save_checkpoint, tensor_sha256
from encoder import MAEConfig, MAEResNet
from test_cache import vae_file  # noqa: F401 (a fixture: a tiny SD-VAE file)
from test_data import SIZE, folder  # noqa: F401 (a fixture: an image folder)
from test_reliability import files  # noqa: F401 (a fixture: stand-in digits and MAE)
from test_reliability import gen_args, refused, two_ranks_under_way
from test_train_mae import write_standin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def mae2(tmp_path_factory):
    """Another random MAE of the stand-in's architecture (other weights)."""
    path = tmp_path_factory.mktemp("mae2") / "mae2.safetensors"
    torch.manual_seed(1)
    cfg = MAEConfig(in_channels=1, base_channels=8, layers=(1, 1, 1, 1), num_classes=10)
    save_checkpoint(MAEResNet(cfg, with_heads=False), str(path), kind="mae")
    return path


@pytest.fixture(scope="module")
def run_a(files, tmp_path_factory):
    """A complete 2-step run with EMA snapshots and a sample grid."""
    out = tmp_path_factory.mktemp("a") / "run"
    train.main(gen_args(files, out, "--steps", 2, "--snapshot-every", 1, "--sample-every", 1))
    return out


def tree(run):
    """Every file under a run folder (snapshots/ included) -> its bytes."""
    return {os.path.relpath(os.path.join(d, f), run): open(os.path.join(d, f), "rb").read()
            for d, _, names in os.walk(run) for f in names}


def reseal(path, tensors, meta):
    """Write tensors + metadata with every digest recomputed (a forger's file, or a writer's
    without our checks), so that only the check under test can refuse it."""
    meta = dict(meta, sha256=json.dumps({k: tensor_sha256(v) for k, v in tensors.items()}))
    save_file(tensors, str(path), dict(meta, meta_sha256=metadata_sha256(meta)))


def read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_kills_at_every_moment_of_the_run_folder(tmp_path):
    """tests/kill_harness.py folder: SIGKILL at each moment (before each call) of an
    --overwrite run replacing a complete one (its log before the first save, the save, the
    folder swap, the old run's removal), of --resume's log.jsonl rewrite and its EMA snapshot
    writes, of sample.py's parts and .npz. After every kill the folder holds the old run or
    the new one (never neither, never a mixture); the resumed log and snapshots end equal to
    an uninterrupted run's; sample.py's .npz is whole or absent; a rerun finishes each, and
    leaves no .next/.old folder and no part file."""
    res = subprocess.run([sys.executable, "tests/kill_harness.py", str(tmp_path), "folder"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    for case, n in (("overwrite", 9), ("resume", 6), ("sample", 5)):
        mine = [r for r in rows if r["case"] == case]
        assert len(mine) == n and [r["code"] for r in mine] == [-9] * (n - 1) + [0], mine
    for r in rows:
        if r["case"] == "overwrite":
            assert r["state"] in ("old", "new") and r["again"] == 0, r
            assert r["final_new"] and r["left"] == [], r
        elif r["case"] == "resume":
            assert r["log_rows"] >= 2 and r["log_prefix"] and r["snapshots_whole"], r
            assert r["again"] == 0 and r["final_same"], r
        else:
            assert r["whole_or_absent"] and r["again"] == 0 and r["final"] == ["s.npz"], r
    states = [r["state"] for r in rows if r["case"] == "overwrite"]
    assert "old" in states and "new" in states       # the kills fell on both sides of the swap


def test_1_and_4_overwrite_replaces_the_run_whole(files, run_a, tmp_path, capsys):
    """--overwrite with a run that fails before its first save (--lr 1e30) leaves the old run
    byte for byte; one that saves replaces the whole folder: no old snapshots/ (which fid.py
    steps would mix in), no old log rows, nothing beside it but its lock."""
    run = tmp_path / "run"
    shutil.copytree(run_a, run)
    before = tree(run)
    refused(capsys, lambda: train.main(gen_args(files, run, "--steps", 2, "--lr", 1e30,
                                                "--overwrite")), "No checkpoint was written")
    assert tree(run) == before
    train.main(gen_args(files, run, "--steps", 2, "--lr", 2e-3, "--overwrite"))
    after = tree(run)
    assert not any(f.startswith("snapshots") for f in after)
    rows = [json.loads(r) for r in after["log.jsonl"].decode().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["lr"] == 2e-3
    assert json.loads(read(run / "model.safetensors")[1]["args"])["lr"] == 2e-3
    assert sorted(os.listdir(tmp_path)) == [".run.lock", "run"]


def test_2_resume_rewrites_log_jsonl_whole_or_not_at_all(files, run_a, tmp_path, capsys,
                                                        monkeypatch):
    """--resume drops the log rows after the checkpoint through a temp file and a rename: an
    interruption at the rename leaves the old rows (not an empty file) and no temp file."""
    run = tmp_path / "run"
    shutil.copytree(run_a, run)
    rows = (run / "log.jsonl").read_text()
    real = os.replace

    def interrupted(a, b):
        if str(b).endswith("log.jsonl"):
            raise KeyboardInterrupt
        return real(a, b)
    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.main(["--resume", "--out", str(run), "--steps", "3"])
    assert (run / "log.jsonl").read_text() == rows
    assert sorted(os.listdir(run)) == sorted(os.listdir(run_a))


def test_3_sample_writes_no_file_but_its_out(files, run_a, tmp_path, monkeypatch, capsys):
    """sample.py --num-samples: a user's s.tmp.npz and s.npz.part0.npy are left alone; on a
    full disk while writing the parts nothing is left to keep the disk full, and no s.npz."""
    mine = {"s.tmp.npz": b"mine", "s.npz.part0.npy": b"mine too"}
    for name, body in mine.items():
        (tmp_path / name).write_bytes(body)
    out = str(tmp_path / "s.npz")
    argv = ["sample.py", "--ckpt", str(run_a), "--num-samples", "20", "--out", out]
    monkeypatch.setattr(sys, "argv", argv)
    with torch.enable_grad():
        sample.main()
    assert np.load(out)["arr_0"].shape == (20, 28, 28, 1)
    assert {f: (tmp_path / f).read_bytes() for f in mine} == mine
    os.remove(out)
    real = np.save

    def full(path, arr):
        with open(path, "wb") as f:
            f.write(b"x" * 1000)                        # what a full disk leaves
        raise OSError(28, "No space left on device (injected)")
    monkeypatch.setattr(np, "save", full)
    with pytest.raises(SystemExit) as e, torch.enable_grad():
        sample.cli()
    assert "No space left" in str(e.value) and "Traceback" not in capsys.readouterr().err
    monkeypatch.setattr(np, "save", real)
    assert sorted(os.listdir(tmp_path)) == sorted(mine)


def test_5_a_second_process_is_locked_out_and_a_killed_one_leaves_no_lock(files, run_a,
                                                                           tmp_path):
    """While one process holds the run folder, another train.py on it (--resume) is refused
    naming the lock, writing nothing; a holder killed with SIGKILL leaves no stuck lock."""
    run = tmp_path / "run"
    shutil.copytree(run_a, run)
    before = tree(run)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, runfolder; "
                               f"runfolder.claim_run_folder({str(run)!r}, True, False); "
                               "print('held', flush=True); time.sleep(60)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        res = subprocess.run([sys.executable, "train.py", "--resume", "--out", str(run),
                              "--steps", "3"], cwd=ROOT, capture_output=True, text=True)
        assert res.returncode == 1 and "Traceback" not in res.stderr
        assert "another process is running in this folder" in res.stderr and ".run.lock" in \
            res.stderr
        assert tree(run) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    train.main(["--resume", "--out", str(run), "--steps", "3"])
    assert read_train_state(run)["step"] == 3


def test_6_metadata_is_verified_like_the_tensors(files, run_a, tmp_path, capsys):
    """One character of the recorded args changed (lr), a file without the digests, a tensor
    without one: each refused, naming the file; nothing resumes on them."""
    run = tmp_path / "run"
    shutil.copytree(run_a, run)
    path = run / "model.safetensors"
    tensors, meta = read(path)
    args = json.loads(meta["args"])
    save_file(tensors, str(path), dict(meta, args=json.dumps(dict(args, lr=0.5))))
    refused(capsys, lambda: train.main(["--resume", "--out", str(run), "--steps", "3"]),
            str(path), "does not match its recorded meta_sha256")
    save_file(tensors, str(path), {k: v for k, v in meta.items() if "sha256" not in k})
    refused(capsys, lambda: sample.load_checkpoint(str(run)), str(path),
            "no recorded checksums")
    sums = json.loads(meta["sha256"])
    sums.pop("final.linear.weight")
    kept = dict(meta, sha256=json.dumps(sums))
    save_file(tensors, str(path), dict(kept, meta_sha256=metadata_sha256(kept)))
    refused(capsys, lambda: sample.load_checkpoint(str(run)), str(path),
            "final.linear.weight", "no recorded sha256")


def test_7_resume_names_a_replaced_mae(files, mae2, tmp_path, capsys):
    """The run records the frozen MAE's identity (a hash of its digests): --resume after the
    file at --mae-ckpt was replaced by another MAE is refused naming it, the run untouched;
    --change-args goes on with the new one."""
    run, mae = tmp_path / "run", tmp_path / "mae.safetensors"
    shutil.copy(files / "mae.safetensors", mae)
    train.main(gen_args(files, run, "--steps", 2, "--mae-ckpt", mae))
    recorded = json.loads(read(run / "model.safetensors")[1]["data"])["mae_sha256"]
    assert recorded == checkpoint.weights_sha256(str(mae))
    shutil.copy(mae2, mae)                              # the same path, other weights
    before = tree(run)
    refused(capsys, lambda: train.main(["--resume", "--out", str(run), "--steps", "3"]),
            "the mae weights", str(mae), "are not the ones", "--change-args")
    assert tree(run) == before
    train.main(["--resume", "--out", str(run), "--steps", "3", "--change-args"])
    assert read_train_state(run)["step"] == 3


@pytest.mark.parametrize("flag,value", [("--clip", "nan"), ("--sample-alpha", "nan"),
                                        ("--attract", "nan"), ("--taus", "nan"),
                                        ("--lr", "inf"), ("--seed", "-1"),
                                        ("--no-cfg-frac", "2"), ("--betas", "0.9 1.5"),
                                        ("--repel", "-inf")])
def test_8_every_float_flag_finite_and_in_range_before_any_work(files, tmp_path, capsys, flag,
                                                                value):
    """A non-finite or out-of-range value is refused by name (exit 2) before any work: no
    run folder is made."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(gen_args(files, out, "--steps", 2, flag, *value.split()))
    assert e.value.code == 2 and flag in capsys.readouterr().err
    assert not out.exists()


def test_8_n_pos_beyond_memory_is_refused_by_name(files, tmp_path, capsys):
    out = tmp_path / "run"
    refused(capsys, lambda: train.main(gen_args(files, out, "--steps", 2, "--n-pos",
                                                10 ** 9)), "--n-pos 1000000000", "GB")
    assert not out.exists()


def test_9_an_image_folder_link_loop_counts_each_image_once(tmp_path):
    from PIL import Image
    (tmp_path / "a").mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "a" / f"{i}.png")
    os.symlink("..", tmp_path / "a" / "loop")
    assert data.open_images(str(tmp_path))[1] == 2


def bomb_png(path, side=20000):
    """A tiny PNG whose header claims side x side pixels (a decompression bomb)."""
    from PIL import Image
    Image.new("L", (1, 1)).save(path)
    raw = bytearray(open(path, "rb").read())
    raw[16:24] = struct.pack(">II", side, side)                   # IHDR width, height
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))  # and its CRC
    open(path, "wb").write(bytes(raw))


def test_10_messages_not_tracebacks(files, run_a, tmp_path, capsys):
    """A checkpoint tensor of another shape on --resume; a float64 tensor or an odd head dim
    for sample.py; a 20000x20000 PNG; a tampered cache index or shard header: each one
    message naming the file."""
    run = tmp_path / "run"
    shutil.copytree(run_a, run)
    tensors, meta = read(run / "model.safetensors")
    tensors["final.linear.weight"] = tensors["final.linear.weight"][:, :3].contiguous()
    reseal(run / "model.safetensors", tensors, {k: v for k, v in meta.items()
                                                if k != "meta_sha256"})
    refused(capsys, lambda: train.main(["--resume", "--out", str(run), "--steps", "3"]),
            str(run), "do not fit this run's model")
    tensors, meta = read(run_a / "model.safetensors")
    f64 = tmp_path / "f64.safetensors"
    reseal(f64, {k: v.double() if v.is_floating_point() else v for k, v in tensors.items()},
           {k: v for k, v in meta.items() if k != "meta_sha256"})
    refused(capsys, lambda: sample.load_generator(str(f64), "cpu"), str(f64), "float64")
    odd = tmp_path / "odd.safetensors"
    cfg = json.loads(meta["config"])
    reseal(odd, tensors, dict({k: v for k, v in meta.items() if k != "meta_sha256"},
                              config=json.dumps(dict(cfg, num_heads=3))))
    refused(capsys, lambda: sample.load_generator(str(odd), "cpu"), str(odd), "head dim")
    (tmp_path / "img").mkdir()
    bomb_png(tmp_path / "img" / "big.png")
    refused(capsys, lambda: data.open_images(str(tmp_path / "img")), "big.png",
            "not a readable image")
    idx = tmp_path / "cache" / "index.json"
    idx.parent.mkdir()
    for bad in ({"num_shards": 0, "vae": "v", "size": 256}, {"num_shards": "3"}, [1, 2], "x"):
        idx.write_text(json.dumps(bad))
        refused(capsys, lambda: cache.LatentCache(str(idx.parent)), str(idx), "num_shards")
    shard = tmp_path / "shard.safetensors"
    shard.write_bytes(struct.pack("<Q", 2 ** 40) + b"{}")
    refused(capsys, lambda: cache.mmap_safetensors(str(shard)), str(shard), "header claims")


def test_10_a_killed_ddp_peer_ends_the_job_with_a_message(files, tmp_path):
    """Two gloo ranks; rank 1 is killed outright (SIGKILL) mid-run: rank 0 ends with the
    peer message and exit 1, no gloo traceback."""
    procs = two_ranks_under_way(files, tmp_path / "run")
    try:
        procs[1].kill()
        err = procs[0].communicate(timeout=120)[1]
        assert procs[0].returncode == 1, err[-2000:]
        assert "a peer process died" in err and "Traceback" not in err, err[-2000:]
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_10_cache_on_a_full_disk_says_so_and_leaves_no_partial_shard(folder, vae_file,
                                                                      tmp_path, monkeypatch):
    """cache.py: a shard write that fails (ENOSPC) is one message naming the shard; no
    .tmp is left (a rerun resumes from the finished shards)."""
    def full(tensors, path, metadata=None):
        open(path, "wb").write(b"x" * 100)              # what a full disk leaves
        raise OSError(28, "No space left on device (injected)")
    monkeypatch.setattr(cache, "save_file", full)
    with pytest.raises(OSError, match="shard_00000.safetensors: could not write the shard"):
        cache.cache_latents(folder[0], str(tmp_path / "c"), vae_file, size=SIZE, shard_size=4,
                            batch=4, workers=1)
    assert not [f for f in os.listdir(tmp_path / "c") if f.endswith(".tmp")]


def test_11_out_a_file_and_a_run_stopped_before_its_first_checkpoint(files, tmp_path, capsys):
    """--out naming a file: refused by name before any data is read. A run folder with a log
    but no checkpoint: a new run says pass --overwrite, --resume says so too; --overwrite works.
    A torn last line of log.jsonl is dropped with a note naming the file; a bad middle line
    is refused naming the file and line."""
    (tmp_path / "f").write_text("not a folder")
    with pytest.raises(SystemExit):
        train.main(gen_args(files, tmp_path / "f", "--steps", 2))
    assert "--out" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.txt").write_text("step 0000001 | ...\n")
    refused(capsys, lambda: train.main(gen_args(files, run, "--steps", 2)), "--overwrite",
            "before its first checkpoint")
    refused(capsys, lambda: train.main(["--resume", "--out", str(run)]), "--overwrite",
            "before its first checkpoint")
    train.main(gen_args(files, run, "--steps", 2, "--overwrite"))
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 3, "lo')                      # what a full disk leaves
    train.main(["--resume", "--out", str(run), "--steps", "3"])
    assert "log.jsonl: its last line was cut off" in capsys.readouterr().out
    assert [json.loads(r)["step"] for r in open(run / "log.jsonl")] == [1, 2, 3]
    lines = (run / "log.jsonl").read_text().splitlines()
    (run / "log.jsonl").write_text("\n".join([lines[0], "garbage", lines[2]]) + "\n")
    refused(capsys, lambda: train.main(["--resume", "--out", str(run), "--steps", "4"]),
            "log.jsonl: line 2 is not JSON")


def test_12_a_stop_between_log_rows_resumes_to_the_same_history(files, tmp_path, monkeypatch):
    """SIGINT after step 4 of a run logging every 3 steps, then --resume: the history equals
    the uninterrupted run's (rows at 3 and 6, the second averaging steps 4-6), bitwise."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    args = lambda out: gen_args(files, out, "--steps", 6, "--log-every", 3)
    train.main(args(whole))
    real = train.lr_at

    def stop_at_4(step, a):
        if step == 3:
            train.STOP.append(signal.SIGINT)            # as cli's handler does on Ctrl-C
        return real(step, a)
    monkeypatch.setattr(train, "lr_at", stop_at_4)
    with pytest.raises(SystemExit) as e:
        train.main(args(cut))
    train.STOP.clear()
    monkeypatch.setattr(train, "lr_at", real)
    assert e.value.code == 130 and read_train_state(cut)["step"] == 4
    assert [h["step"] for h in read_train_state(cut)["history"]] == [3]
    train.main(["--resume", "--out", str(cut)])
    assert read_train_state(cut)["history"] == read_train_state(whole)["history"]
