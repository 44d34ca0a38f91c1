"""Model speed benchmark: parameters, GFLOPs, inference and training images/s of every model at its size.

Usage: ``.venv/bin/python -m benchmarks.model_speed [--threads N]``. Uses random inputs and untrained
weights (speed does not depend on the values), channels_last, batch 64 and batch 1; writes
``docs/benchmarks/model_speed.md``. Holds the heavy-job lock.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks._common import heavy_lock, machine, write_fragment
from catsdogs.models.factory import create_model
from catsdogs.runtime import setup

# (model, image size, extra kwargs): the configurations documented in docs/models.md.
CONFIGS: tuple[tuple[str, int, dict[str, int]], ...] = (
    ("seed", 64, {}),
    ("cnn", 112, {"width": 32, "depth": 1}),
    ("effnet_lite0", 128, {}),
    ("effnet_lite0", 180, {}),
    ("effnet_lite1", 180, {}),
    ("effnet_lite2", 180, {}),
)


def images_per_s(model: torch.nn.Module, size: int, batch: int, train: bool, reps: int = 3) -> float:
    """Best-of-``reps`` images/s of forward (eval) or forward+backward+step (train)."""
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,)).float()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4) if train else None
    model.train(train)
    best = 0.0
    for i in range(reps + 1):  # the first round warms oneDNN's kernel caches
        t = time.perf_counter()
        if train:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x)[:, 0], y)
            opt.zero_grad()  # type: ignore[union-attr]
            loss.backward()
            opt.step()  # type: ignore[union-attr]
        else:
            with torch.inference_mode():
                model(x)
        if i:
            best = max(best, batch / (time.perf_counter() - t))
    return best


def gflops(model: torch.nn.Module, size: int) -> float:
    """Forward GFLOPs of one image (torch's FlopCounterMode; multiply-add = 2 FLOPs)."""
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.randn(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    args = parser.parse_args()
    rows = []
    with heavy_lock():
        threads = setup(args.threads, "cpu", 0) and torch.get_num_threads()
        for name, size, kw in CONFIGS:
            model = create_model(name, 2, size, pretrained=False, **kw).to(memory_format=torch.channels_last)
            row = (name, size, kw, sum(p.numel() for p in model.parameters()), gflops(model, size),
                   images_per_s(model, size, 64, False), images_per_s(model, size, 1, False, reps=10),
                   images_per_s(model, size, 64, True))
            print(row, flush=True)
            rows.append(row)
    flags = f" --threads {args.threads}" if args.threads else ""
    wait = os.environ.get("OMP_WAIT_POLICY")
    env = f"OMP_WAIT_POLICY={wait} " if wait else ""
    lines = [
        "## Model speed\n",
        f"Command: `{env}.venv/bin/python -m benchmarks.model_speed{flags}`"
        f"; machine: {machine()}; torch {torch.__version__}, {threads} threads, channels_last, "
        "random weights and inputs, best of 3 rounds.\n",
        "| model | size | settings | params | GFLOPs/img | infer img/s (batch 64) | infer img/s (batch 1) "
        "| train img/s (batch 64) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, size, kw, params, gf, inf64, inf1, tr in rows:
        settings = ", ".join(f"{k}={v}" for k, v in kw.items()) or "-"
        lines.append(f"| {name} | {size} | {settings} | {params:,} | {gf:.2f} | {inf64:.0f} | {inf1:.0f} "
                     f"| {tr:.0f} |")
    path = write_fragment("model_speed", "\n".join(lines))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
