"""Compute a dataset's reference feature statistics (.npz, pytorch-fid compatible) for FID / fd_digits.

    lcsc-fid-stats --data digits --extractor digits --out stats/digits.npz
    lcsc-fid-stats --data cifar10:~/data --extractor inception --out stats/cifar10.npz \
        --inception-weights ~/pt_inception-2015-12-05-6726825d.pth

(`python launch/fid_stats.py ...` is the same command.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lcsc_ray.errors import LcscError


def build_parser() -> argparse.ArgumentParser:
    from lcsc_ray.features import EXTRACTORS

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="dataset spec: digits, cifar10:<folder>, <file>.npz or <folder>")
    parser.add_argument("--extractor", required=True, choices=sorted(EXTRACTORS), help="feature extractor")
    parser.add_argument("--out", required=True, type=Path, help="output .npz (mu, sigma + metadata)")
    parser.add_argument("--inception-weights", default=None,
                        help="pt_inception-2015-12-05-6726825d.pth (default: torch hub cache, else download)")
    parser.add_argument("--batch-size", type=int, default=250, help="images per extractor call (default 250)")
    parser.add_argument("--device", default="auto",
                        help="torch device: auto (a visible GPU, else the CPU), cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (0 = torch's default: all cores) (default 1)")
    return parser


def main(argv: list[str] | None = None) -> None:
    import torch

    from lcsc_ray.data import load_images
    from lcsc_ray.devices import resolve_device
    from lcsc_ray.features import build_extractor
    from lcsc_ray.reference_stats import compute_reference_stats, save_reference_stats

    args = build_parser().parse_args(argv)
    if args.out.suffix != ".npz":
        raise LcscError(f"--out {args.out}: must end in .npz (the pytorch-fid statistics format)")
    if args.batch_size < 1:
        raise LcscError(f"--batch-size {args.batch_size}: must be a positive number of images")
    device = resolve_device(args.device)  # before loading the data: a wrong device fails at once
    if args.threads:
        torch.set_num_threads(args.threads)
    images = load_images(args.data)
    extractor = build_extractor(args.extractor, device=device, inception_weights=args.inception_weights)
    stats = compute_reference_stats(images, extractor, batch_size=args.batch_size, dataset=args.data)
    path = save_reference_stats(args.out, stats)
    print(f"wrote {path}: {stats.meta['num_samples']} images, {extractor.metric_name} features d={extractor.dim}")
