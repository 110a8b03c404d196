"""clipline: Ray workflows that turn image URL lists into trained and evaluated CLIP models."""

__version__ = "0.1.0"

# no phoning home from Ray, MLflow, albumentations (imported by img2dataset) or huggingface_hub, in any
# process that imports clipline; the entry points that start Ray call it too (pipelines/offline.py)
from pipelines.offline import keep_local  # noqa: E402

keep_local()
