"""One FID against fixed reference statistics: ``frechet_distance`` of the sample fit vs ``reference_fid``.

Both give the same number (``tests/test_images.py``); ``reference_fid`` needs one symmetric eigendecomposition of
the smaller of n x n and D x D (and reuses the reference's square root when n >= D), where the Gaussian fit needs
two of D x D. D = 128 is the MNIST reference CNN's feature size, D = 2048 InceptionV3's. Features are random
Gaussians with a random covariance (the cost does not depend on the values). Median of ``--repeats``.

    python benchmarks/fid_speed.py [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from difflab.metrics.frechet import (  # noqa: E402
    bootstrap_fid_std,
    feature_statistics,
    frechet_distance,
    psd_sqrt,
    reference_fid,
)


def median_seconds(function, repeats: int, *args) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fit_then_frechet(samples: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> float:
    return frechet_distance(*feature_statistics(samples), mean, cov)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'n':>6} {'D':>5} {'fit + frechet_distance':>23} {'reference_fid':>14} {'ratio':>6} {'rel. diff':>10}")
    generator = torch.Generator().manual_seed(0)
    for n, dim in [(2000, 128), (300, 2048), (2000, 2048), (10000, 2048)]:
        mixing = torch.randn(dim, dim, generator=generator, dtype=torch.float64) / dim**0.5
        reference = torch.randn(max(n, dim + 1), dim, generator=generator, dtype=torch.float64) @ mixing
        samples = torch.randn(n, dim, generator=generator, dtype=torch.float64) @ mixing + 0.1
        mean, cov = feature_statistics(reference)
        root = psd_sqrt(cov)
        old = median_seconds(fit_then_frechet, args.repeats, samples, mean, cov)
        new = median_seconds(reference_fid, args.repeats, samples, mean, cov, root)
        a, b = fit_then_frechet(samples, mean, cov), reference_fid(samples, mean, cov, root)
        print(f"{n:>6} {dim:>5} {old:>21.3f} s {new:>12.3f} s {old / new:>5.1f}x {abs(a - b) / a:>10.1e}")
    n, dim = 2000, 2048
    mixing = torch.randn(dim, dim, generator=generator, dtype=torch.float64) / dim**0.5
    samples = torch.randn(n, dim, generator=generator, dtype=torch.float64) @ mixing
    mean, cov = feature_statistics(torch.randn(4000, dim, generator=generator, dtype=torch.float64) @ mixing)
    start = time.perf_counter()
    bootstrap_fid_std(samples, mean, cov, rounds=20)
    seconds = time.perf_counter() - start
    print(f"bootstrap_fid_std, n = {n}, D = {dim}, 20 rounds: {seconds:.1f} s")


if __name__ == "__main__":
    main()
