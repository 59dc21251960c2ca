"""
Train a Drifting Model generator, or its feature encoder. One loop, plain python or torchrun.

  --stage gen  the generator (Alg. 1, App. A.6-A.9; official train.py::train_step): per step
               N_c class groups, each with one CFG alpha, N_neg generated, N_pos positive and
               N_unc unconditional real samples; the drift loss on every feature group of the
               frozen MAE. --model picks the preset and its recipe (Tab. 8).
  --stage mae  the feature encoder phi, a ResNet masked autoencoder (App. A.3).
Flag defaults are the recipe of the --model (or of the MAE) on the same command line: `python
train.py --model L2 --help` shows what L2 runs; a flag given overrides it.

    python train.py --stage mae                   # MNIST-5k MAE, CPU: ~1 min (2 cores)
    python train.py --model S4                    # the generator on its features: ~12 min
    python train.py --model S4 --steps 2000 --resume     # continue that run, with its own flags
    torchrun --standalone --nproc_per_node=8 train.py --model L2 --data-path CACHE --mae-ckpt M
    torchrun --standalone --nproc_per_node=8 train.py --stage mae --mae-model latent_640 \\
        --data-path CACHE             # the paper's MAE: sharded (--fsdp auto), --micro-batch 256

Checkpoint: --out/model.safetensors, ONE file (checkpoint.save_checkpoint) with the weights, EMA,
optimizer and RNG states, args, and a sha256 per tensor (an FSDP run's too: gathered whole),
in a run folder that holds one run whole (runfolder.py); replaced atomically, written only
when the updated weights give a finite loss. --resume verifies it and takes the run's recorded
flags. Ctrl-C / SIGTERM: the step ends, a checkpoint is written, exit 130 / 143 (twice: at once).
Paper: Generative Modeling via Drifting, arXiv:2602.04770 (v2). Equation numbers refer to v2.
"""
import copy
import datetime
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import field
import field_fast
from cache import embed_all, open_data
from checkpoint import (file_sha256, full, read_checkpoint, resume_run, save_training, stopped,
                        weights_sha256)
from config import PRESET, check_data, cls_lambda, draw_numbers, lr_at, parse_args
from convnext import convnext_from_hf, pixel_feature_groups
from data import Prefetch, TensorSampler, draw_groups, split_per_class, subset
from encoder import (ACTIVATION_KWARGS, MAE_models, BasicBlock, MAEConfig, MAEResNet, UpBlock,
                     mae_from_state)
from memory import plan
from metrics import held_out, progress, write_log
from models import DriftDiT, DriftDiT_models, DriftDiTConfig, update_ema
from runfolder import claim_run_folder, prepare_run_folder, replace_run
from sample import finish_gen, finish_mae, generate, pictures
from step import generator_step, mae_step


# --- Setup: DDP, data, the model to train and its inputs ---
def setup_ddp(args):
    """nanoGPT's idiom: torchrun sets RANK; plain python is one process. -> (ddp, rank,
    world, device, a CPU (gloo) group for the stop flag); the device is cuda:LOCAL_RANK under
    torchrun on GPUs."""
    ddp = "RANK" in os.environ                     # set by torchrun; absent under plain python
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: this torch {torch.__version__} sees no CUDA "
                         f"device; pass --device cpu (or install a CUDA build of torch)")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", device.index or 0)))
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(minutes=args.ddp_timeout)     # a frozen peer ends the job
    if ddp:                                                     # instead of hanging the others
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return ddp, rank, world, device, dist.new_group(backend="gloo", timeout=timeout) if (
        ddp) else None


def setup_mae(args, images, labels, shape, world, rank, device):
    """--stage mae: the MAEResNet to train (App. A.3) and a sampler over all but --holdout
    items per class (kept for the final evaluation)."""
    cfg = MAEConfig(**MAE_models[args.mae_model])
    train_idx, held_idx = split_per_class(labels, max(1, args.holdout))
    check_data(args, cfg, shape, labels, world, n_train=len(train_idx))
    held_idx = held_idx[::max(1, len(held_idx) // 1000)]      # evaluate at most ~1000 items
    with torch.device("meta"):      # fp32 weights, gradients, AdamW's 2 moments, the EMA: DDP
        need = 20 * sum(p.numel() for p in MAEResNet(cfg).parameters())    # on every GPU
    have = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    fsdp = args.fsdp == "on" or (args.fsdp == "auto" and world > 1 and need > 0.9 * have > 0)
    per_gpu = need / world if fsdp else need                    # FSDP: 1/world of it per GPU
    if per_gpu > 0.9 * have > 0:
        raise ValueError(f"--mae-model {args.mae_model}: {need / 20e9:.2f}B parameters need "
                         f"{need / 1e9:.0f} GB (weights, gradients, AdamW, EMA), "
                         f"{per_gpu / 1e9:.0f} GB per GPU "
                         f"{'sharded over' if fsdp else 'under DDP with'} {world} ranks; this "
                         f"GPU has {have / 1e9:.0f} GB: use more GPUs under torchrun (--fsdp "
                         f"auto shards the state), convert the official MAE, or a smaller one")
    if rank == 0:
        how = "FSDP" if fsdp else "whole copies (DDP)" if world > 1 else "one process"
        print(f"plan per rank: {how}, {per_gpu / 1e9:.2f} GB of state; "
              f"{args.batch // world} samples per step in passes of "
              f"{args.micro_batch or args.batch // world} (--micro-batch)")
    torch.manual_seed(args.seed)                                # the same init on every rank
    model = MAEResNet(cfg)
    rank_seed = args.seed * world + rank
    sampler = TensorSampler(subset(images, train_idx), labels[train_idx], rank_seed)
    torch.manual_seed(rank_seed)                                # masks: one stream per rank
    return SimpleNamespace(model=model, cfg=cfg, sampler=sampler, streams={"data": sampler},
                           info=dict(holdout=args.holdout), images=images, fsdp=fsdp,
                           train_idx=train_idx, held_idx=held_idx)


def shard(model, device):
    """--fsdp (the paper-size MAE stage): PyTorch FSDP2. Every BasicBlock / UpBlock, then the
    rest of the model, keeps 1/world of its weights on each rank, and so of its gradients,
    AdamW's moments and (the EMA sharded alike) the EMA; a block's weights are all-gathered
    for its forward and again for its backward, then freed; gradients are reduce-scattered
    (averaged, as DDP's all-reduce). The same loss and updates as DDP: tests/test_train_mae."""
    from torch.distributed.fsdp import fully_shard          # here: a 1 s import, MAE runs only
    mesh = dist.device_mesh.init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.modules():
        if isinstance(block, (BasicBlock, UpBlock)):
            fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def unshard(model, keep, device):
    """A sharded MAE -> on the rank that keeps it, a whole copy (the others get None): the
    final evaluation runs on rank 0 alone. Every rank calls it (each tensor is gathered)."""
    state = {k: full(v, keep) for k, v in model.state_dict().items()}   # None where not keep
    if not keep:
        return None
    with torch.device("meta"):
        whole = MAEResNet(model.cfg)
    whole.load_state_dict(state, assign=True)
    return whole.to(device).train(model.training)


def load_encoder(args, cfg, device):
    """The frozen feature encoder phi of --stage gen: the MAE of --mae-ckpt, and for the
    pixel models ConvNeXt-V2 beside it. -> (phi: x -> feature groups, or the MAEResNet)."""
    if not args.mae_ckpt or not os.path.exists(args.mae_ckpt):
        raise ValueError(f"--mae-ckpt {args.mae_ckpt}: no such file or run folder. The "
                         f"generator needs a trained feature encoder: train it first with "
                         f"`python train.py --stage mae --out {args.mae_ckpt or 'runs/mae'}` "
                         f"(MNIST, CPU: ~1 min), or convert an official MAE with convert.py")
    phi = mae_from_state(*read_checkpoint(args.mae_ckpt, "mae")[:2], encoder_only=True)
    # held in bf16 on CUDA under --precision bf16 (official use_bf16): half the memory, no
    # autocast copy of every conv weight; ConvNeXt stays float32 (official convnext_bf16)
    bf16 = device.type == "cuda" and args.precision == "bf16"
    phi = phi.to(device, torch.bfloat16 if bf16 else None).requires_grad_(False).eval()
    if phi.cfg.in_channels != cfg.in_channels:
        raise ValueError(f"--mae-ckpt {args.mae_ckpt}: an MAE of {phi.cfg.in_channels}-"
                         f"channel inputs; --model {args.model} makes {cfg.in_channels} "
                         f"channels: pass the MAE trained on this --data")
    if (args.model in ("B16", "L16") and not args.convnext) or (
            args.convnext and cfg.in_channels != 3):
        raise ValueError(f"--model {args.model} with --convnext {args.convnext}: the pixel "
                         f"models B16, L16 (RGB) use ConvNeXt-V2 features beside the MAE, "
                         f"pass --convnext PATH (facebook/convnextv2-base-22k-224 weights)")
    if args.convnext:                                           # pixel models: two encoders
        convnext, mae = convnext_from_hf(args.convnext, args.convnext_model).to(device), phi
        phi = lambda x: pixel_feature_groups(mae, convnext, x, **ACTIVATION_KWARGS)
    if args.eval_every and not isinstance(phi, MAEResNet):
        raise ValueError("--eval-every: FD_MAE needs an MAE encoder alone (not the pixel "
                         "models' MAE + ConvNeXt); pass --eval-every 0")
    return phi


def setup_gen(args, images, labels, shape, world, rank, device):
    """--stage gen: the DriftDiT to train, its frozen encoder phi, the held-out reals of the
    progress metrics (--eval-every), the feature cache (--cache-features), the sampler, and
    this rank's class groups (each group lives whole on one rank)."""
    cfg = DriftDiTConfig(**{**DriftDiT_models[PRESET.get(args.model, args.model)],
                            "grad_checkpoint": args.grad_checkpoint})
    check_data(args, cfg, shape, labels, world)
    phi = load_encoder(args, cfg, device)
    torch.manual_seed(args.seed)                                # the same init on every rank
    model, real, cached = DriftDiT(cfg), None, None
    if args.eval_every:                 # the metric's real samples are held out of training
        real, images, labels = held_out(phi, images, labels, args.holdout, device)
    if args.cache_features:             # the sampler then draws item indices, not images
        cached, images = embed_all(phi, images.to(device)), torch.arange(len(images))
        if rank == 0:
            print(f"--cache-features: {len(images)} real samples' feature groups, "
                  f"{sum(v.numel() for v in cached.values()) * 4 / 2 ** 30:.2f} GiB")
    per_rank, sampler = args.n_classes_per_step // world, TensorSampler(images, labels, args.seed)
    mine = range(rank * per_rank, (rank + 1) * per_rank)
    ahead = Prefetch(lambda step: draw_groups(sampler, cfg, step, mine, **draw_numbers(args)),
                     device)            # the next step's draw, made while this one runs
    return SimpleNamespace(model=model, cfg=cfg, sampler=sampler, streams={}, phi=phi, real=real,
                           cached=cached, mine=mine, ahead=ahead, fsdp=False,
                           info=dict(mae=args.mae_ckpt, mae_sha256=weights_sha256(args.mae_ckpt),
                                     convnext=args.convnext, convnext_sha256=file_sha256(
                                         args.convnext), holdout=args.holdout if args.eval_every
                                     else None))


# --- Helpers of the loop: the passes of a step, the held-out metrics, the stop flag ---
def plan_passes(args, s, raw, amp, draw, device, group, loss_kw):
    """--micro-groups -> this rank's class groups per forward/backward pass (memory.plan:
    auto probes the GPU with draw(), the first step's draw); rank 0 prints the plan."""
    def try_step(m):                # no DDP, no all-reduce: a rank out of memory stops alone
        generator_step(raw, raw, s.phi, draw(), m, True, s.cached, amp, **loss_kw)
        raw.zero_grad(set_to_none=True)
    micro, peak = plan(args.micro_groups, len(s.mine), device, try_step, group)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"plan per rank: {len(s.mine)} class groups, {micro} per pass x "
              f"{-(-len(s.mine) // micro)} passes (--micro-groups {args.micro_groups}), "
              f"activation checkpointing {'on' if args.grad_checkpoint else 'off'}; peak: " + (
                  f"{peak / 1e9:.1f} GB probed" if peak else "the log's GB column"))
    return micro


def evaluate(args, ema, s, device):
    """--eval-every: EMA samples of fixed seeds (--eval-n per class) vs the held-out reals."""
    lab = s.sampler.classes.repeat_interleave(args.eval_n)
    x = torch.cat([generate(ema, list(range(len(lab)))[i:i + 250], lab[i:i + 250],
                            args.sample_alpha, 2, device)
                   for i in range(0, len(lab), 250)])           # (K eval_n, C, H, W)
    return progress(s.phi, x, lab, s.real)


def stop_requested(group):
    """A SIGINT / SIGTERM seen by cli's handler (STOP), on any rank: all ranks stop after the
    same step (a 1-number all_reduce over `group`, a CPU (gloo) one: the GPUs never wait)."""
    flag = torch.tensor([float(bool(STOP))])
    if group is not None:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return flag.item() > 0


# --- Main: DDP, data, models, optimizer, then the loop ---
def main(argv=None):
    args = parse_args(argv, __doc__)
    master = int(os.environ.get("RANK", 0)) == 0   # only this rank prints, logs and saves
    out = claim_run_folder(args.out, args.resume, args.overwrite) if master else args.out
    ddp, rank, world, device, stop_group = setup_ddp(args)
    if master:
        print(json.dumps(vars(args)))
    images, labels, shape = open_data(args.data, args.data_path, args.image_size,
                                      args.augment)
    s = (setup_mae if args.stage == "mae" else setup_gen)(args, images, labels, shape, world,
                                                          rank, device)
    meta = dict(kind=args.stage, config=json.dumps(asdict(s.cfg)), args=json.dumps(vars(args)),
                data=json.dumps(dict(data=args.data, path=args.data_path, **s.info)))
    if master:
        print(f"{type(s.model).__name__}: {sum(p.numel() for p in s.model.parameters()) / 1e6:.2f}"
              f"M params | {len(labels)} samples of shape {shape}")

    # -- optimizer, EMA, resume, DDP --
    raw = s.model.to(device)
    ema = copy.deepcopy(raw).requires_grad_(False).eval()
    if s.fsdp:                      # --fsdp: each rank keeps 1/world of the state
        raw, ema = shard(raw, device), shard(ema, device)
    opt = torch.optim.AdamW(raw.parameters(), lr=args.lr, betas=tuple(args.betas),
                            weight_decay=args.weight_decay)
    start, history, pending = 0, [], None
    if args.resume:
        start, history, pending = resume_run(args.out, raw, ema, opt, meta, s.streams, rank,
                                             world, device, strict=not args.change_args)
    else:
        update_ema(ema, raw, 0.0)
    saved_at = start or None
    net = DDP(raw, device_ids=[device.index] if device.type == "cuda" else None,
              gradient_as_bucket_view=True) if ddp and not s.fsdp else raw    # grads: buckets
    if args.compile:                # opt-in: minutes of compiling first, then faster steps
        net = torch.compile(net)
    raw.train()                     # important: the MAE masks and the generator's dropout
    amp = torch.autocast(device.type, torch.bfloat16,
                         enabled=device.type == "cuda" and args.precision == "bf16")
    ckpt = os.path.join(args.out, "model.safetensors")
    if master:                      # the folder is made now that every input has been checked
        prepare_run_folder(out, args.resume, start, args.snapshot_every)
    # issue 18's ablations (field_fast has a and b; parse_args refuses the others with it)
    loss_kw = dict(taus=args.taus, drift_loss=field_fast.drift_loss if args.fast_loss else
                   field.drift_loss, kernel=args.kernel, kernel_norm=args.kernel_norm,
                   sinkhorn_iters=args.sinkhorn_iters, a=args.attract, b=args.repel)

    def draw(step):                 # this rank's share of the step, on the device
        return [t.to(device) for t in s.sampler.batch(args.batch // world)] if (
            args.stage == "mae") else s.ahead.get(step)

    def losses(model, batch, step, backward=True):
        """The stage's loss on one step's batch, and its gradients -> (loss, {name: value})."""
        if args.stage == "gen":     # Alg. 1: the drift loss on every feature group
            loss, V2 = generator_step(model, raw, s.phi, batch, micro, backward, s.cached, amp,
                                      all_reduce=(lambda t: dist.all_reduce(t) or t) if ddp
                                      else None, exact=args.micro_stats == "step", **loss_kw)
            return loss, {f"V2_{tau}": v for tau, v in V2.items()}
        lam = cls_lambda(step, args)    # App. A.3: masked L2 (+ lambda CE in the fine-tune)
        loss, out = mae_step(model, *batch, lam, args.micro_batch, backward, amp)
        info = {"recon": out["recon_loss"]}
        if args.cls_start >= 0:
            info.update(cls=out["cls_loss"], acc=out["accuracy"],
                        lam=torch.tensor(lam, device=device))
        return loss, info

    micro = plan_passes(args, s, raw, amp, lambda: draw(start), device, stop_group, loss_kw) if (
        args.stage == "gen") else None              # --micro-groups: class groups per pass

    # -- the loop: draw, loss, backward, clip, AdamW, EMA; log, evaluate, save --
    sums = {k: v.to(device) for k, v in pending["sums"].items()} if pending else {}
    n, t0 = pending["n"] if pending else 0, time.time()         # a stop's partial log row
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=args.stage,
               disable=not master, mininterval=1.0)
    for step in bar:
        lr = lr_at(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = draw(step)
        opt.zero_grad(set_to_none=True)
        loss, info = losses(net, batch, step)       # forward and backward (micro-batches)
        gnorm = full(torch.nn.utils.clip_grad_norm_(raw.parameters(),  # FSDP: a DTensor
                                                    args.clip if args.clip > 0 else math.inf))
        opt.step()
        update_ema(ema, raw, args.ema)
        for k, v in dict(loss=loss.detach(), gnorm=gnorm, **info).items():
            sums[k] = sums.get(k, 0) + v.float()             # on device: no sync
        n, done = n + 1, step + 1
        if master and args.stage == "gen":
            pictures(args, out, ema, s, done, device)           # the grid, EMA snapshots
        stopping = stop_requested(stop_group)       # SIGINT / SIGTERM: save, then exit
        scheduled = done % args.ckpt_every == 0 or done == args.steps    # a save in any run
        save_now = stopping or scheduled
        eval_now = args.stage == "gen" and args.eval_every > 0 and (
            done % args.eval_every == 0 or done == args.steps)
        row = done % args.log_every == 0 or eval_now or scheduled         # a row in any run
        if not (row or stopping):
            continue
        avg = torch.stack(list(sums.values())) / n                  # one all_reduce per line
        if ddp:
            dist.all_reduce(avg, op=dist.ReduceOp.AVG)
        avg, img_s = dict(zip(sums, avg.tolist())), n * args.batch / (time.time() - t0)
        if not all(map(math.isfinite, avg.values())):
            # NOTE: checked at log/checkpoint steps only (a per-step check would sync every
            # step); no checkpoint is written after the bad step, so the last one stays good.
            raise stopped(f"non-finite loss or gradient in steps {done - n + 1}..{done} "
                          f"({avg})", args.out, args.lr, saved_at)
        if eval_now and master:     # EMA samples of fixed seeds vs the held-out digits
            avg.update(evaluate(args, ema, s, device))
        if row:                     # a stop between rows logs none: its sums are saved instead
            history.append(dict(step=done, **avg))
        if row and master:
            bar.write(write_log(out, done, avg, lr, img_s, device, args.eval_every > 0))
        if save_now:                # only weights whose loss is finite are ever saved
            bad = save_training(os.path.join(out, "model.safetensors"), raw, ema, opt, done, meta,
                                history, s.streams, world, device,
                                lambda: losses(raw, batch, step, False)[0], None if row else dict(
                                    sums=sums, n=n))
            if bad:
                raise stopped(bad, args.out, args.lr, saved_at)
            if master and out != os.path.abspath(args.out):     # --overwrite: the new run
                out = replace_run(out, args.out)                # replaces the old one, whole
            saved_at = done
        if stopping:
            sig = signal.Signals(STOP[0] if STOP else signal.SIGTERM)
            if master:
                print(f"{sig.name}: stopped after step {done}; checkpoint {ckpt}. Continue with: "
                      f"python train.py --resume --out {args.out}", file=sys.stderr)
            raise SystemExit(128 + sig)
        sums, n, t0 = {}, 0, time.time()

    # -- the end: curves, pictures, evaluation (rank 0) --
    summary = dict(step=args.steps, **{k: v for k, v in history[-1].items() if k != "step"})
    if master and args.stage == "gen":
        finish_gen(args, out, history)
    if s.fsdp:                      # rank 0 evaluates alone: whole copies
        raw, ema = unshard(raw, master, device), unshard(ema, master, device)
    if master and args.stage == "mae":
        summary = finish_mae(args, out, raw, ema, s, history, device)
    if master:
        print(f"wrote {ckpt} (step {args.steps}) and in {args.out}: " + ", ".join(sorted(
            f for f in os.listdir(out) if f.endswith((".png", ".txt", ".jsonl")))))
    if ddp:
        dist.barrier()                                          # rank 0 finished its pictures
        dist.destroy_process_group()
    return summary


STOP = []   # the signals cli's handler has seen; the loop saves and exits at the step's end


def cli(argv=None):
    """The command line: SIGINT / SIGTERM end the run at the next step boundary with a
    checkpoint (the same signal again: at once, the last complete checkpoint stands), and a
    refused input or a failed run ends in one message (from rank 0 under torchrun), exit 1."""
    def on_signal(sig, frame):
        if STOP:
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
        STOP.append(sig)
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"\n{signal.Signals(sig).name}: finishing this step, then a checkpoint (send "
                  f"it again to stop at once)", file=sys.stderr, flush=True)
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_signal)
    try:
        main(argv)
    except (ValueError, OSError, FloatingPointError, RuntimeError) as e:
        peer = isinstance(e, dist.DistError) or any(s in str(e) for s in (
            "Timed out", "Connection closed by peer", "Connection reset by peer"))   # gloo's
        if isinstance(e, RuntimeError) and not peer:
            raise                                       # a bug: keep its traceback
        if int(os.environ.get("RANK", 0)) == 0 or isinstance(e, OSError) or peer:
            print(f"train.py: error: {e}" + (" (a peer process died, or did not answer "
                  "within --ddp-timeout; the last checkpoint stands, continue with --resume)"
                  if peer else ""), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli()
