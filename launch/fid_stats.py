"""Reference feature statistics of a dataset for FID / fd_digits (= `lcsc-fid-stats`); `--help` lists every flag.

    python launch/fid_stats.py --data digits --extractor digits --out stats/digits.npz
"""

from lcsc_ray.cli import main_fid_stats

if __name__ == "__main__":
    main_fid_stats()
