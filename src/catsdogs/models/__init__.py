"""Models: the registry and ``create_model`` factory, heads, architectures and image transforms."""
