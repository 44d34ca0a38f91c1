"""Stage 3, ``catsdogs evaluate``: metrics, plots and the self-contained HTML report."""
