"""Stage 1, ``catsdogs preprocess``: list, plan the split, decode in Spark tasks, write shards."""
