"""The evaluate stage (in progress): CLIP_benchmark metrics first; the stage comes with issue 5."""
