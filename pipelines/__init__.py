"""clipline: Ray workflows that turn image URL lists into trained and evaluated CLIP models."""

import os

__version__ = "0.1.0"

# albumentations (imported by img2dataset's resizer) asks PyPI for updates at import: never at run time.
# Set here so Ray workers, which inherit the driver's environment, have it too.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
