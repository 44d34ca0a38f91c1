"""DDP helpers used inside the training loop: the collective backend, reductions, replica checks.

Everything the loop needs from ``torch.distributed`` lives here; each helper is the identity in a
single process, so the loop runs unchanged with or without DDP. Launching processes is
:mod:`catsdogs.train.launch`'s job.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def backend_for(device: torch.device) -> str:
    """Return the collective backend for a device type: nccl for CUDA, gloo for CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def is_distributed() -> bool:
    """Return True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum values over DDP ranks (identity in a single process)."""
    if not is_distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def check_replicas(model: torch.nn.Module) -> float:
    """Verify every DDP rank ends with rank 0's weights; return the largest difference (0.0).

    DDP averages gradients so all replicas take identical steps; a rank that trained alone (model
    not wrapped, group not joined) would drift. Raises RuntimeError naming the difference.
    """
    if not is_distributed() or dist.get_world_size() < 2:
        return 0.0
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    diff = (flat - ref).abs().max().reshape(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    worst = float(diff.item())
    if worst != 0.0:
        raise RuntimeError(f"DDP replicas diverged: weights differ from rank 0 by up to {worst:.3g}")
    if dist.get_rank() == 0:
        print(f"replicas in sync: {dist.get_world_size()} ranks hold identical weights "
              f"({flat.numel():,} parameters)", flush=True)
    return worst
