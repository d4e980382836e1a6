"""The machine's fp32 matmul throughput: the peak that MFU is measured against.

Square matmuls give the peak; the benchmark model's own GEMM shapes (batch 8 × context 256
= 2048 rows, width 384) show how close a training step's matmuls can come to it.

    python benchmarks/bench_matmul.py
    python benchmarks/bench_matmul.py --threads 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    add_common_args,
    machine_line,
    matmul_flops_per_s,
    print_table,
    setup,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    args = parser.parse_args(argv)
    setup(args)

    print(f"machine: {machine_line(args.clock)}\n")
    square = {
        n: matmul_flops_per_s(n, repeats=args.repeats, clock=args.clock)
        for n in (512, 1024, 2048, 4096)
    }
    peak = square[2048]
    rows = [
        [f"{n}×{n} @ {n}×{n}", f"{f / 1e9:.1f}", f"{100 * f / peak:.0f}%"]
        for n, f in square.items()
    ]
    # (rows, inner, outer) of the benchmark model's matmuls: forward; backward uses the
    # transposes of these, which MKL handles without copies.
    shapes = {
        "qkv 2048×384 @ 384×1152": (2048, 384, 1152),
        "attn proj 2048×384 @ 384×384": (2048, 384, 384),
        "mlp up 2048×384 @ 384×1536": (2048, 384, 1536),
        "mlp down 2048×1536 @ 1536×384": (2048, 1536, 384),
        "lm head 2048×384 @ 384×512": (2048, 384, 512),
        "weight grad 1536×2048 @ 2048×384": (1536, 2048, 384),
    }
    for name, (m, k, n) in shapes.items():
        f = matmul_flops_per_s(m, k, n, repeats=args.repeats, clock=args.clock)
        rows.append([name, f"{f / 1e9:.1f}", f"{100 * f / peak:.0f}%"])
    print_table(["fp32 matmul", "GFLOP/s", "of 2048² peak"], rows)
    print(f"\npeak (2048²): {peak / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
