"""Compute a dataset's reference feature statistics (.npz, pytorch-fid compatible) for FID / fd_digits.

    python launch/fid_stats.py --data digits --extractor digits --out stats/digits.npz
    python launch/fid_stats.py --data cifar10:~/data --extractor inception --out stats/cifar10.npz \
        --inception-weights ~/pt_inception-2015-12-05-6726825d.pth
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lcsc_ray.errors import LcscError, run_cli  # noqa: E402


def parse_args() -> argparse.Namespace:
    from lcsc_ray.features import EXTRACTORS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="dataset spec: digits, cifar10:<folder>, <file>.npz or <folder>")
    parser.add_argument("--extractor", required=True, choices=sorted(EXTRACTORS), help="feature extractor")
    parser.add_argument("--out", required=True, type=Path, help="output .npz (mu, sigma + metadata)")
    parser.add_argument("--inception-weights", default=None,
                        help="pt_inception-2015-12-05-6726825d.pth (default: torch hub cache, else download)")
    parser.add_argument("--batch-size", type=int, default=250, help="images per extractor call")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    return parser.parse_args()


def main() -> None:
    import torch

    from lcsc_ray.data import load_images
    from lcsc_ray.features import build_extractor
    from lcsc_ray.reference_stats import compute_reference_stats, save_reference_stats

    args = parse_args()
    if args.out.suffix != ".npz":
        raise LcscError(f"--out {args.out}: must end in .npz (the pytorch-fid statistics format)")
    if args.batch_size < 1:
        raise LcscError(f"--batch-size {args.batch_size}: must be a positive number of images")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise LcscError(f"--device {args.device!r}: not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LcscError(f"--device {args.device}: no CUDA GPU is visible here; use --device cpu")
    images = load_images(args.data)
    extractor = build_extractor(args.extractor, device=device, inception_weights=args.inception_weights)
    stats = compute_reference_stats(images, extractor, batch_size=args.batch_size, dataset=args.data)
    path = save_reference_stats(args.out, stats)
    print(f"wrote {path}: {stats.meta['num_samples']} images, {extractor.metric_name} features d={extractor.dim}")


if __name__ == "__main__":
    run_cli(main)
