"""HTTP serving of a trained run: FastAPI app, micro-batcher, inference backends and the web page."""
