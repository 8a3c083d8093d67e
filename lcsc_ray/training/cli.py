"""The flags of `lcsc-train-cm` / `lcsc-train-dm` (launch/train_*.py): one parser, defaults from demo.py."""

from __future__ import annotations

import argparse
import json

from lcsc_ray.errors import LcscError
from lcsc_ray.models.unet import EMB_MODES
from lcsc_ray.training.demo import DEFAULTS, default_run_dir
from lcsc_ray.training.loop import ADAM_BETA2, make_config, train

TITLES = {
    "cm": "Consistency training (improved CT: Karras σ grid, boundary-condition scalings, growing N, "
          "pseudo-Huber loss, no target EMA).",
    "dm": "EDM diffusion training (denoiser preconditioning, log-normal σ, EDM loss weighting).",
}


def build_parser(kind: str) -> argparse.ArgumentParser:
    d = DEFAULTS[kind]
    m = d["model_kwargs"]
    parser = argparse.ArgumentParser(
        description=f"{TITLES[kind]} Saves raw and EMA weights every --save-every steps as safetensors, resumes "
        "from the newest checkpoint when rerun on the same --out, and writes samples.png (EMA) and samples_raw.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", default=str(default_run_dir(kind)), help="run folder (the default is the one the LCSC search reuses)")
    parser.add_argument("--data", default=d["data"], help="'digits' (bundled 8x8), 'cifar10:<folder>', a .npz of uint8 images, or an image folder")
    parser.add_argument("--steps", type=int, default=d["steps"], help="total optimizer updates")
    parser.add_argument("--save-every", type=int, default=d["save_every"], help="checkpoint cadence in updates")
    parser.add_argument("--batch-size", type=int, default=d["batch_size"], help="training batch size")
    parser.add_argument("--lr", type=float, default=d["lr"], help="Adam learning rate (after linear warm-up)")
    parser.add_argument("--warmup", type=int, default=d["warmup"], help="linear learning-rate warm-up in updates")
    parser.add_argument("--lr-anneal", default=None, metavar="START,FINAL", help="cosine learning-rate anneal from "
                        "the fraction START of training down to FINAL x lr at the last update (default: constant lr)")
    parser.add_argument("--adam-beta2", type=float, default=ADAM_BETA2, help="Adam's second-moment decay")
    parser.add_argument("--init-weights", default=None, metavar="FILE", help="start from this .safetensors "
                        "state dict of the same network (e.g. a diffusion run's EMA) instead of a random initialisation")
    parser.add_argument("--grad-clip", type=float, default=0.0, help="clip the gradient norm to this value (0 = off)")
    if kind == "cm":
        c = d["loss_settings"]
        parser.add_argument("--s1", type=int, default=c["s1"], help="largest CT discretisation N (iCT: 1280)")
        parser.add_argument("--curriculum-end", type=float, default=c["curriculum_end"], help="fraction of "
                            "training after which N is held at --s1 (0 or 1: iCT's schedule over the whole run)")
    parser.add_argument("--ema-decay", type=float, default=d["ema_decay"], help="decay of the training EMA saved in checkpoints_ema/")
    parser.add_argument("--seed", type=int, default=d["seed"], help="seed for initialisation, batches and noise")
    parser.add_argument("--model", default="unet", help="model factory: a registered name or 'package.module:function'")
    parser.add_argument("--channels", type=int, default=m["channels"], help="U-Net base width (CIFAR-10 scale: 128)")
    parser.add_argument("--channel-mult", default=",".join(map(str, m["channel_mult"])), help="width multiplier per resolution level, comma separated (CIFAR-10 scale: 1,2,2,2)")
    parser.add_argument("--num-blocks", type=int, default=m["num_blocks"], help="residual blocks per level (CIFAR-10 scale: 2)")
    parser.add_argument("--attention", action="store_true", help="self-attention at the lowest resolution")
    parser.add_argument("--emb-mode", choices=EMB_MODES, default=m["emb_mode"], help="noise conditioning of the "
                        "residual blocks: added to the activations, or a scale and shift of their normalisation")
    parser.add_argument("--dropout", type=float, default=m["dropout"], help="dropout in residual blocks")
    parser.add_argument("--model-kwargs", default=None, help="JSON kwargs for a custom --model (replaces the U-Net size flags)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 avoids oversubscription on shared CPUs; 0 = torch's default: all cores)")
    parser.add_argument("--device", default="auto", help="torch device for the network and data: auto (a visible GPU, else the CPU), cpu, cuda or cuda:N")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _loss_settings(args: argparse.Namespace) -> dict:
    """The CT curriculum flags as run.json `training` entries (`curriculum_end` left out for iCT's schedule)."""
    if not 0 <= args.curriculum_end <= 1:
        raise LcscError(f"--curriculum-end {args.curriculum_end}: give a fraction in [0, 1]")
    held = 0 < args.curriculum_end < 1
    return {"s1": args.s1, **({"curriculum_end": args.curriculum_end} if held else {})}


def _lr_anneal(text: str | None) -> tuple[float, float] | None:
    """--lr-anneal START,FINAL as two floats (range checks in make_config)."""
    if text is None:
        return None
    try:
        start, final = (float(v) for v in text.split(","))
    except ValueError:
        raise LcscError(f"--lr-anneal {text!r}: give START,FINAL, e.g. 0.6,0.1") from None
    return start, final


def main(kind: str, argv: list[str] | None = None) -> None:
    """Train (or resume) the run of `kind` described by the flags and print its statistics as JSON."""
    args = build_parser(kind).parse_args(argv)
    if args.model_kwargs is not None:
        try:
            model_kwargs = json.loads(args.model_kwargs)
        except json.JSONDecodeError as error:
            raise LcscError(f"--model-kwargs: not valid JSON ({error}); e.g. '{{\"width\": 64}}'") from None
    else:
        try:
            mult = [int(v) for v in args.channel_mult.split(",")]
        except ValueError:
            raise LcscError(f"--channel-mult {args.channel_mult!r}: give integers separated by commas, e.g. 1,2") from None
        model_kwargs = {"channels": args.channels, "channel_mult": mult, "num_blocks": args.num_blocks,
                        "attention": args.attention, "dropout": args.dropout, "emb_mode": args.emb_mode}
    config = make_config(
        kind, data=args.data, steps=args.steps, save_every=args.save_every, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, model_kwargs=model_kwargs, ema_decay=args.ema_decay, warmup=args.warmup, factory=args.model,
        loss_settings=_loss_settings(args) if kind == "cm" else {}, grad_clip=args.grad_clip,
        adam_beta2=args.adam_beta2, lr_anneal=_lr_anneal(args.lr_anneal), init_weights=args.init_weights,
    )
    stats = train(args.out, config, quiet=args.quiet, threads=args.threads or None, device=args.device)
    print(json.dumps({"run_dir": str(args.out), **stats}))
