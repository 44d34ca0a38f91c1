"""Forward-only use of a trained run: the predictor, ``catsdogs predict`` and ``catsdogs export``."""
