"""The evaluate stage: zero-shot classification and retrieval metrics (CLIP_benchmark's), logged to MLflow."""
