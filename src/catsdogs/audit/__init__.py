"""Data audit: label errors, duplicates, leakage, outliers and unusual images in a shards folder."""
