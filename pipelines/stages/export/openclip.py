"""`python -m pipelines.stages.export.openclip ARGS...`: open_clip's own trainer (`open_clip_train.main`) on an export.

It takes open_clip_train's command line unchanged and adds two things before calling its `main`:
- clipline's JSON model configs (`clip-tiny`, `clip-small`, `clip-rn-tiny`) are registered, so `--model` may name them;
- webdataset's end-of-shard marker is switched off for open_clip_train's tar reader. Since webdataset 0.2.96,
  `tar_file_expander` yields `eof_value={}` after each shard, and open_clip_train 3.3.0's `group_by_keys_nothrow`
  reads `["fname"]` from it and fails with KeyError: 'fname' on every webdataset (webdataset/webdataset#384,
  mlfoundations/open_clip#935); the fix its maintainers name is `eof_value=None`, passed here. An explicit
  `eof_value` from a later open_clip_train still wins (a partial's keywords yield to the caller's).
The module is never imported by the export stage itself, so the stage's driver stays free of torch.
"""

from __future__ import annotations

import functools
import inspect
import sys


def patch_eof_marker() -> None:
    """Make open_clip_train's webdataset reader expand tars without webdataset's end-of-shard marker."""
    from open_clip_train import data

    expander = data.tar_file_expander
    if isinstance(expander, functools.partial) or "eof_value" not in inspect.signature(expander).parameters:
        return  # already patched, or a webdataset without the marker
    data.tar_file_expander = functools.partial(expander, eof_value=None)


def main(argv: list[str]) -> int:
    from open_clip_train.main import main as train

    from pipelines.models import register_configs

    register_configs()
    patch_eof_marker()
    return train(argv) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
