"""What a `clipline` command shows on the console, and where everything else goes.

The seam between the CLI and the runner: `ray_init_kwargs` is what `runner.init_ray` passes to `ray.init` for
the driver's and the workers' logs.
"""

from __future__ import annotations

import logging
from typing import Any


def ray_init_kwargs() -> dict[str, Any]:
    """Keyword arguments for `ray.init` that decide where Ray's and the workers' logs go."""
    return {"log_to_driver": True, "logging_level": logging.WARNING}
