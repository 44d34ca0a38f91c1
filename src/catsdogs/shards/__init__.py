"""Shards: the manifest, the shard writer and readers, and the verified cache of remote shards."""
