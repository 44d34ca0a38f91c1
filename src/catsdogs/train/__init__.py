"""Stage 2, ``catsdogs train`` and ``tune``: the shard stream, the loop, DDP and frozen-backbone heads."""
