"""Time the second-moment statistics ROME/MEMIT whiten with (and their cache hit).

    python scripts/bench_stats.py --layer 4 --n-samples 200
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import editkit
from editkit.stats import second_moment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--layer", type=int, default=4)
    parser.add_argument("--n-samples", type=int, default=200)
    parser.add_argument("--corpus", default="model_samples")
    args = parser.parse_args()
    lm = editkit.load_model(args.model)
    module = lm.adapter.path("mlp_out", args.layer)
    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        mom2 = second_moment(lm, module, args.corpus, args.n_samples, cache_dir=cache, progress=False)
        computed = time.perf_counter() - started
        started = time.perf_counter()
        second_moment(lm, module, args.corpus, args.n_samples, cache_dir=cache, progress=False)
        cached = time.perf_counter() - started
    eigenvalues = torch.linalg.eigvalsh(mom2)
    print(f"{module}: {mom2.shape[0]}x{mom2.shape[1]} from {args.n_samples} texts in {computed:.1f} s "  # noqa: T201
          f"(cache hit {cached:.2f} s); condition number {float(eigenvalues[-1] / eigenvalues[0]):.3g}")


if __name__ == "__main__":
    main()
