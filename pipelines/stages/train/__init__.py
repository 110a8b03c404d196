"""The train stage: sharded open_clip training on Ray Train, fed by Ray Data, logged to MLflow from rank 0."""
