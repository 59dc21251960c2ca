"""
What a run of train.py is: the recipes (the paper's Tab. 8 rows, the MAE's App. A.3, and our
CPU presets), the flat command line, the checks every value passes before any work, and the
--resume merge (a run continues with the flags recorded in its checkpoint).

Flag defaults are the recipe of the --model (or --mae-model) on the same command line, so
`python train.py --model L2 --help` shows what L2 runs; a flag given overrides it.
Paper: Generative Modeling via Drifting, arXiv:2602.04770 (v2), Tab. 8, App. A.3, A.6-A.9.
"""
import argparse
import math
import os
import sys

from cache import CACHE_MAKE
from checkpoint import read_metadata
from convnext import ConvNeXt_models
from encoder import MAE_models

# ------------------------------------------------------------------------------------------
# The recipes: one complete row per recipe (Tab. 8 and configs/*/*.yaml; S2/S4/S8 are ours)
# ------------------------------------------------------------------------------------------
# How the paper sizes fit 80 GB (docs/memory.md, `python memory.py`): each GPU's 16 class
# groups a few per pass, activation checkpointing. Estimated peaks: B2 3 per pass 53 GiB,
# L2 2 per pass 48 GiB, L16 1 per pass 48 GiB (B16, a smaller DiT, as L16).
FIT_B2, FIT_16 = dict(micro_groups=3, grad_checkpoint=True), dict(micro_groups=1,
                                                                  grad_checkpoint=True)
RECIPES = {
    # App. A.3, configs/mae/latent_ablation_256.yaml: constant lr after a linear warmup
    "mae": dict(data="latents", out="runs/mae", steps=30000, batch=8192, lr=4e-3, warmup=4000,
                weight_decay=0.01, ema=0.9995, micro_batch=256),
    # ^ micro_batch: on 8 x 80 GB, 1024 samples per GPU in 4 passes of 256 (latent_640 under
    # FSDP: an estimated 57 GiB per GPU, 179 GiB in one pass; docs/memory.md)
    # --mae-model mnist (CPU, MNIST-5k's 4,500 training digits): the paper's batch 8192 would
    # be ~2 epochs per step and ~20 GB; 400 steps of 64 take ~1 min on 2 cores, and the S4
    # generator trained on the per-pixel 400-step MAE was no worse than on 800 steps (README)
    "mae_mnist": dict(data="mnist5k", out="runs/mae_mnist", steps=400, batch=64, lr=4e-3,
                      warmup=50, weight_decay=0.01, ema=0.99, log_every=50, ckpt_every=200),
    # B/2 sizes with the ablation recipe of Tab. 8 (N_pos: paper B/2 128, official code 64)
    "ablation": dict(data="latents", out="runs/ablation", steps=30000, n_classes_per_step=64,
                     gen_per_label=64, n_pos=64, n_unc=16, lr=2e-4, weight_decay=0.01,
                     warmup=5000, ema=0.999, cfg_power=3.0, no_cfg_frac=0.0, **FIT_B2),
    "B2": dict(data="latents", out="runs/B2", steps=200000, n_classes_per_step=128,
               gen_per_label=64, n_pos=64, n_unc=32, lr=4e-4, weight_decay=0.0, warmup=10000,
               ema=0.999, cfg_power=5.0, no_cfg_frac=0.0, **FIT_B2),
    "L2": dict(data="latents", out="runs/L2", steps=200000, n_classes_per_step=128,
               gen_per_label=64, n_pos=64, n_unc=32, lr=4e-4, weight_decay=0.01, warmup=10000,
               ema=0.999, cfg_power=3.0, no_cfg_frac=0.5, micro_groups=2, grad_checkpoint=True),
    "B16": dict(data="images", out="runs/B16", steps=100000, n_classes_per_step=128,
                gen_per_label=64, n_pos=128, n_unc=32, lr=2e-4, weight_decay=0.01, warmup=10000,
                ema=0.999, cfg_power=5.0, no_cfg_frac=0.0, augment=True, **FIT_16),
    "L16": dict(data="images", out="runs/L16", steps=100000, n_classes_per_step=128,
                gen_per_label=64, n_pos=128, n_unc=32, lr=4e-4, weight_decay=0.01, warmup=10000,
                ema=0.999, cfg_power=5.0, no_cfg_frac=0.0, augment=True, **FIT_16),
    # CPU presets. S4: MNIST-5k in 15 minutes with its MAE (README: the search). EMA 0.99 and
    # lr 2e-3 as a CPU run is 1200 steps, not 30k (the zero-initialized output starts gray and
    # moves ~lr per step toward the black background); all 10 classes in every step (3 per
    # step lost the classes, README); 8 generated but 32 positives per class, as more
    # positives help (Tab. 2) and cost little with --cache-features; field_fast, as the loss
    # is a large share of a CPU step (README). Its MAE (the mnist preset) sees 2x2 patches.
    # NOTE: attract=1.5 (V = 1.5 V+ - V-) departs from the paper's V+ - V- on purpose: far from
    # equilibrium (1200 steps) the extra pull toward the data is worth FID on MNIST (README,
    # the search), while only a = b keeps q = p as the fixed point, which matters for long
    # runs; --attract 1 gives the paper's field. S8: the pixel path, 64x64.
    "S4": dict(data="mnist5k", out="runs/gen_mnist", steps=1200, n_classes_per_step=10,
               gen_per_label=8, n_pos=32, n_unc=4, lr=2e-3, weight_decay=0.01, warmup=50,
               ema=0.99, cfg_power=3.0, no_cfg_frac=0.0, mae_ckpt="runs/mae_mnist",
               device="cpu", log_every=20, ckpt_every=300, sample_every=300, fast_loss=True,
               cache_features=True, eval_every=300, snapshot_every=300, attract=1.5),
    "S2": dict(data="latents", out="runs/S2", steps=1000, n_classes_per_step=8,
               gen_per_label=16, n_pos=16, n_unc=4, lr=1e-3, weight_decay=0.01, warmup=50,
               ema=0.99, cfg_power=3.0, no_cfg_frac=0.0),
    "S8": dict(data="images", out="runs/S8", steps=100, n_classes_per_step=4, gen_per_label=8,
               n_pos=8, n_unc=4, lr=1e-3, weight_decay=0.01, warmup=10, ema=0.99,
               cfg_power=3.0, no_cfg_frac=0.0, image_size=64, augment=True),
}
ABLATION_FLAGS = ["kernel", "kernel_norm", "sinkhorn_iters"]   # field.drift_loss only (issue 18)
PRESET = {"ablation": "B2"}     # recipe -> DriftDiT_models preset (the others share its name)
DATA = ["mnist5k", "latents", "images"]
# --resume: flags that may differ from the run's recorded ones (schedule length, logging,
# where it runs); any other change needs --change-args, as the run would stop being the same.
FREE = {"steps", "log_every", "ckpt_every", "sample_every", "sample_alpha", "device", "compile",
        "ddp_timeout", "out", "resume", "overwrite", "change_args", "snapshot_every",
        "cache_features", "micro_groups", "grad_checkpoint", "fsdp", "micro_batch"}
POSITIVE = ["steps", "log_every", "ckpt_every", "batch", "holdout", "n_classes_per_step",
            "gen_per_label", "n_pos", "image_size", "cls_ramp", "lr", "ddp_timeout",
            "micro_batch"]
NON_NEGATIVE = ["warmup", "weight_decay", "n_unc", "sample_every", "cfg_power", "no_cfg_frac",
                "eval_every", "snapshot_every", "seed", "attract", "repel", "cls_lambda"]
POSITIVE += ["eval_n"]
AT_MOST_ONE = ["no_cfg_frac", "cls_lambda"]         # fractions and weights


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the docstring's lines and shows every default."""


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors print on rank 0 only: torchrun starts one copy per GPU."""

    def error(self, message):
        if int(os.environ.get("RANK", 0)) == 0:
            super().error(message)                      # usage + message, exit 2
        sys.exit(2)


def make_parser(recipe, description=None):
    """The flat parser, its defaults set from `recipe` so that --help shows what will run."""
    p = Parser(description=description or __doc__, formatter_class=HelpFormatter,
               allow_abbrev=False)
    a = p.add_argument
    a("--stage", choices=["gen", "mae"], default="gen", help="what to train")
    a("--model", choices=[k for k in RECIPES if not k.startswith("mae")], default="S4",
      help="gen: DriftDiT preset and its recipe (ablation = B2 size, Tab. 8 ablation recipe)")
    a("--out", help="run folder (log, pictures, checkpoint)")
    a("--data", help=f"one of {DATA}: built-in digits, a cache.py folder, an image folder")
    a("--data-path", help="mnist5k: the csv.gz (default: built in); latents: the cache; "
      "images: root/<class>/<image>")
    a("--image-size", type=int, default=256, help="images: ADM center-crop size")
    a("--augment", action=argparse.BooleanOptionalAction, default=False,
      help="images: RandomResizedCrop(0.2-1) + flip (official pixel recipes)")
    a("--steps", type=int, help="optimizer steps in total (also when resuming)")
    a("--lr", type=float, help="peak learning rate (AdamW)")
    a("--lr-decay", choices=["none", "cosine"], default="none", help="after the warmup")
    a("--warmup", type=int, help="linear lr warmup from 1e-6, in steps")
    a("--weight-decay", type=float, help="AdamW weight decay")
    a("--betas", type=float, nargs=2, default=[0.9, 0.95], help="AdamW betas")
    a("--clip", type=float, default=2.0, help="gradient clip (global norm); -1 = off")
    a("--ema", type=float, help="EMA decay per step")
    a("--precision", choices=["bf16", "fp32"], default="bf16", help="CUDA autocast dtype")
    a("--device", default="auto", help="cpu | cuda | auto; torchrun uses cuda:LOCAL_RANK")
    a("--seed", type=int, default=0, help="global seed (data/mask stream of rank r: seed*world+r)")
    a("--log-every", type=int, default=100, help="steps between log lines")
    a("--ckpt-every", type=int, default=5000, help="steps between checkpoints")
    a("--resume", action="store_true", help="continue the run in --out, with its recorded flags")
    a("--change-args", action="store_true", help="--resume: allow flags that change the run "
      "(lr, seed, sizes...); without it such a flag is refused")
    a("--overwrite", action="store_true", help="replace the run in --out (else refused)")
    a("--ddp-timeout", type=float, default=30.0, help="minutes a rank waits for a frozen peer")
    a("--compile", action="store_true", help="torch.compile the model (checkpoints stay plain)")
    g = p.add_argument_group("--stage mae (App. A.3)").add_argument
    g("--mae-model", choices=list(MAE_models), default="mnist", help="encoder.MAE_models preset "
      "and its recipe (mnist, mnist_pixel: the CPU one; the others: the paper's)")
    g("--batch", type=int, help="mae: global batch, split over the ranks (gen: N_c * N_neg)")
    g("--fsdp", choices=["auto", "on", "off"], default="auto", help="mae under torchrun: shard "
      "weights, gradients, AdamW and EMA over the ranks (FSDP2); auto: on CUDA when DDP's 20 "
      "B/param would not fit the GPU. Either way the checkpoint is one whole file")
    g("--micro-batch", type=int, help="mae: samples per forward/backward pass on each rank, "
      "gradients accumulated (the same step); None: the rank's whole share at once")
    g("--cls-start", type=int, default=-1, help="first step of the cls fine-tune; -1 = never")
    g("--cls-ramp", type=int, default=1000, help="steps of the linear lambda ramp")
    g("--cls-lambda", type=float, default=0.1, help="final lambda of lam*CE + (1-lam)*L_rec")
    g("--holdout", type=int, default=50, help="samples per class held out for the evaluation "
      "(mae: the final one; gen: FD_MAE with --eval-every)")
    gen_flags(p.add_argument_group("--stage gen (Alg. 1, App. A.6-A.9)").add_argument)
    p.set_defaults(**recipe)
    return p


def micro_groups(text):
    """--micro-groups: a positive number, or auto."""
    if text == "auto" or text.isdigit() and int(text) > 0:
        return text if text == "auto" else int(text)
    raise argparse.ArgumentTypeError(f"expected a positive number or auto, got {text!r}")


def gen_flags(g):
    """The generator's flags (make_parser's --stage gen group)."""
    g("--n-classes-per-step", type=int, help="N_c groups per step, all ranks (official "
      "train_batch_size)")
    g("--gen-per-label", type=int, help="N_neg generated samples per group (one alpha each)")
    g("--n-pos", type=int, help="N_pos positives per group")
    g("--n-unc", type=int, help="N_unc unconditional real samples per group (CFG negatives)")
    g("--cfg-power", type=float, help="p(alpha) ~ alpha^-k on [1, 4] (official neg_cfg_pw)")
    g("--no-cfg-frac", type=float, help="fraction of groups at alpha = 1 (official no_cfg_frac)")
    g("--taus", type=float, nargs="+", default=[0.2, 0.05, 0.02], help="official R_list")
    g("--kernel", choices=["laplace", "gaussian"], default="laplace", help="drift kernel "
      "(field.drift_loss; Eq. 12 = laplace)")
    g("--kernel-norm", choices=["both", "y", "none", "sinkhorn"], default="both",
      help="affinity normalization (Tab. 11; both = Eq. 17, official)")
    g("--sinkhorn-iters", type=int, default=20, help="--kernel-norm sinkhorn: normalizations")
    g("--attract", type=float, default=1.0, help="a in V = a V+ - b V- (Tab. 1; after the "
      "drift normalization only a / b matters)")
    g("--repel", type=float, default=1.0, help="b in V = a V+ - b V- (Tab. 1)")
    g("--cache-features", action=argparse.BooleanOptionalAction, default=False,
      help="mnist5k: the frozen MAE's features of every real sample computed once, not per "
      "step (the same loss up to rounding; ~2 GB for MNIST-5k)")
    g("--fast-loss", action=argparse.BooleanOptionalAction, default=False,
      help="field_fast.drift_loss (same numbers, faster on CPUs) instead of field.drift_loss")
    g("--mae-ckpt", help="the frozen encoder phi (train.py --stage mae or convert.py)")
    g("--convnext", help="pixel models: ConvNeXt-V2 weights (facebook/convnextv2-base-22k-224, "
      "model.safetensors), the second encoder")
    g("--convnext-model", choices=list(ConvNeXt_models), default="base", help="its preset")
    g("--sample-every", type=int, default=5000, help="EMA sample grid every N steps; 0 = end")
    g("--eval-every", type=int, default=0, help="every N steps: FD_MAE, FD_pix and cls_acc "
      "(samples nearest their own class's mean, in FD_pix's features) of --eval-n EMA samples "
      "per class vs --holdout held-out real ones per class (then not trained on); 0 = off")
    g("--eval-n", type=int, default=50, help="EMA samples per class of the FD metrics")
    g("--snapshot-every", type=int, default=0, help="keep the EMA weights every N steps in "
      "snapshots/ (fid.py steps: FID vs step); 0 = off (small models only)")
    g("--sample-alpha", type=float, default=1.0, help="alpha of the grid")
    g("--micro-groups", type=micro_groups, help="class groups per forward/backward pass on "
      "each rank, gradients accumulated; the drift loss's statistics stay the whole step's. "
      "None: all of the rank's groups in one pass; auto: the most that fit this GPU (probed)")
    g("--micro-stats", choices=["step", "pass"], default="step", help="with several passes: "
      "the drift loss's statistics of the whole step (exact, two no-grad sweeps first), or of "
      "each pass (cheaper; another loss)")
    g("--grad-checkpoint", action=argparse.BooleanOptionalAction, default=False,
      help="recompute each DiT block in the backward: activations of a block's input only, "
      "for about 1/3 more generator compute (official use_remat)")


def given(argv, flag, default):
    """The value of `flag` on the command line (`--flag V` or `--flag=V`), else `default`."""
    for a, b in zip(argv, argv[1:] + [None]):
        if a == flag and b is not None:
            return b
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return default


def parse_args(argv=None, description=None):
    """The recipe of the --stage/--model (--mae-model) on the command line sets the parser's
    defaults, then one strict parse_args (so --help and the run agree, and a typo is an
    error). --resume: the run's recorded flags, then those typed here (resumed_args). Every
    value is checked here, before any work."""
    argv = sys.argv[1:] if argv is None else list(argv)
    stage = given(argv, "--stage", "gen")
    parser = make_parser(RECIPES.get(("mae_mnist" if given(argv, "--mae-model", "mnist")
                                      .startswith("mnist") else "mae") if stage == "mae" else
                                     given(argv, "--model", "S4"), {}), description)
    args = parser.parse_args(argv)
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out}: a file, not a run folder; pass a folder path (it is "
                     f"made) or remove the file")
    if args.resume:
        args = resumed_args(parser, argv, args)
    for k, v in vars(args).items():     # NaN and inf pass no comparison test below: name them
        if any(isinstance(x, float) and not math.isfinite(x) for x in (
                v if isinstance(v, list) else [v])):
            parser.error(f"--{k.replace('_', '-')} {v}: must be a finite number")
    for k in POSITIVE + NON_NEGATIVE:
        v = getattr(args, k)
        if v is not None and not (v > 0 if k in POSITIVE else v >= 0):
            parser.error(f"--{k.replace('_', '-')} {v}: must be {'>' if k in POSITIVE else '>='} 0")
    for k in AT_MOST_ONE:
        if getattr(args, k) is not None and getattr(args, k) > 1:
            parser.error(f"--{k.replace('_', '-')} {getattr(args, k)}: must be <= 1")
    if not all(0 <= b < 1 for b in args.betas):
        parser.error(f"--betas {args.betas}: AdamW's betas must be in [0, 1)")
    if args.eval_every % args.log_every:
        parser.error(f"--eval-every {args.eval_every} must be a multiple of --log-every "
                     f"{args.log_every} (its value goes into that log row)")
    if not 0 <= args.ema < 1 or min(args.taus) <= 0:
        parser.error(f"--ema {args.ema} must be in [0, 1) and --taus {args.taus} > 0")
    if args.data not in DATA:
        parser.error(f"--stage {stage} takes --data from {DATA}, not {args.data!r}")
    if args.data in ("latents", "images") and not args.data_path:
        parser.error(f"--data {args.data} needs --data-path: " + (
            f"the cache folder (make it with: {CACHE_MAKE})" if args.data == "latents"
            else "an ImageNet-layout folder, e.g. .../train"))
    if args.cache_features and args.data != "mnist5k":
        parser.error(f"--cache-features: for --data mnist5k (held in memory), not --data "
                     f"{args.data}; pass --no-cache-features")
    ablated = [k for k in ABLATION_FLAGS if getattr(args, k) != parser.get_default(k)]
    if ablated and args.fast_loss:
        parser.error(f"{' '.join('--' + k.replace('_', '-') for k in ablated)}: the ablations "
                     f"are in field.drift_loss only; add --no-fast-loss")
    if args.sinkhorn_iters < 1:
        parser.error(f"--sinkhorn-iters {args.sinkhorn_iters}: must be >= 1")
    if args.fsdp == "on" and (args.stage != "mae" or "RANK" not in os.environ):
        parser.error("--fsdp on: for --stage mae under torchrun (several processes share the "
                     "MAE's state); the generator's ranks keep whole copies (DDP)")
    if args.stage == "gen":
        args.batch = args.n_classes_per_step * args.gen_per_label   # generated per step: img/s
    return args


def resumed_args(parser, argv, args):
    """--resume: the flags recorded in the run's checkpoint, overridden by the flags typed on
    this command line. A typed flag that differs is named; outside FREE it needs --change-args."""
    try:
        path, meta = read_metadata(args.out)
    except FileNotFoundError:
        parser.error(f"--resume: no checkpoint in {args.out} (model.safetensors); " + (
            "the run there stopped before its first checkpoint: start it again with "
            "--overwrite (not --resume)" if os.path.exists(os.path.join(args.out, "log.txt"))
            else "start the run without --resume"))
    except ValueError as e:
        parser.error(f"--resume: {e}")
    was, unset = meta.get("args", {}), object()     # typed: what this command line sets itself
    typed = vars(parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), unset))))
    typed = {k: v for k, v in typed.items() if v is not unset}
    changed = {k: v for k, v in typed.items() if k in was and was[k] != v and k not in (
        "resume", "change_args", "overwrite", "out")}
    said = lambda keys: ", ".join(f"--{k.replace('_', '-')} {was[k]} -> {changed[k]}"
                                  for k in keys)
    defining = [k for k in changed if k not in FREE]
    if defining and not args.change_args:
        parser.error(f"--resume: this command changes the run in {args.out}: "
                     f"{said(defining)}. Drop those flags to continue it as it was, or pass "
                     f"--change-args")
    if changed and int(os.environ.get("RANK", 0)) == 0:
        print(f"NOTE: resuming {args.out} with {said(changed)}")
    args = argparse.Namespace(**{**vars(args), **was, **typed, "out": args.out, "resume": True})
    if args.steps <= int(meta.get("step", 0)):
        parser.error(f"--steps {args.steps}: {path} is already at step {meta.get('step')}; pass "
                     f"a larger --steps to continue it")
    return args


def draw_numbers(args):
    """The numbers data.draw_groups needs from a --stage gen run's flags."""
    return dict(seed=args.seed, n_classes=args.n_classes_per_step, n_gen=args.gen_per_label,
                n_pos=args.n_pos, n_unc=args.n_unc, cfg_power=args.cfg_power,
                no_cfg_frac=args.no_cfg_frac)


def check_data(args, cfg, shape, labels, world, n_train=None):
    """The loaded data against the model's config (MAEConfig or DriftDiTConfig) and the
    ranks, before any training. shape: one sample's; n_train (mae): items left to train on."""
    K = int(labels.max()) + 1
    if args.stage == "mae":
        if args.batch % world or args.holdout < 1:
            raise ValueError(f"--batch {args.batch} must divide by the {world} ranks and "
                             f"--holdout {args.holdout} must be >= 1 (the final evaluation)")
        if shape[0] != cfg.in_channels or K > cfg.num_classes:
            raise ValueError(f"--data {args.data} holds {shape} samples of {K} classes; "
                             f"--mae-model {args.mae_model} takes {cfg.in_channels} channels "
                             f"and {cfg.num_classes} classes (latents: latent_256 / latent_640; "
                             f"MNIST: mnist)")
        if args.batch // world > n_train:
            raise ValueError(f"--batch {args.batch} ({args.batch // world} per rank) is more "
                             f"than the {n_train} training samples of --data {args.data}: pass "
                             f"a smaller --batch (MNIST: the mnist recipe's 64)")
        return
    if args.n_classes_per_step % world:
        raise ValueError(f"--n-classes-per-step {args.n_classes_per_step} must divide by "
                         f"the {world} ranks (each class group lives whole on one rank)")
    per_step = (args.n_classes_per_step // world * (args.n_pos + args.n_unc + args.gen_per_label)
                * math.prod(shape) * 4)                # bytes of one step's samples per rank
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if per_step > ram:
        raise ValueError(f"--n-pos {args.n_pos}, --n-unc {args.n_unc}, --gen-per-label "
                         f"{args.gen_per_label}, --n-classes-per-step {args.n_classes_per_step}: "
                         f"one step's samples alone would take {per_step / 1e9:.3g} GB per rank, "
                         f"more than this machine's {ram / 1e9:.3g} GB; pass smaller numbers")
    want = (cfg.in_channels, cfg.input_size, cfg.input_size)
    if shape != want or K > cfg.num_classes:
        raise ValueError(f"--data {args.data} holds {shape} samples of {K} classes; --model "
                         f"{args.model} makes {want} of {cfg.num_classes} classes (MNIST: "
                         f"--model S4)")
    if args.eval_every and args.holdout >= labels.bincount().min():
        raise ValueError(f"--holdout {args.holdout}: --data {args.data} has "
                         f"{labels.bincount().min()} samples in its smallest class, none would "
                         f"be left to train on; pass a smaller --holdout or --eval-every 0")


# ------------------------------------------------------------------------------------------
# The schedules of a run
# ------------------------------------------------------------------------------------------
def lr_at(step, args):
    """Linear warmup from 1e-6 (the official optax schedule), then constant or cosine."""
    if step < args.warmup:
        return 1e-6 + (args.lr - 1e-6) * step / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.5 * (1 + math.cos(math.pi * t)) if args.lr_decay == "cosine" else 1.0)


def cls_lambda(step, args):
    """The cls fine-tune weight: 0 before --cls-start, then a linear ramp to --cls-lambda."""
    if args.cls_start < 0 or step < args.cls_start:
        return 0.0
    return args.cls_lambda * min(1.0, (step - args.cls_start) / max(1, args.cls_ramp))
