"""The evaluation library: CLIP_benchmark's zero-shot classification and retrieval, shared by the evaluate
stage (a saved model, embedded by an actor pool) and the train stage (the live model on its ranks).

- `datasets`: evaluation sets (built-ins that need no download, Parquet or webdataset files) as `EvalData`;
- `embed`: the batch loop from images and texts to L2-normalised embeddings, and the Ray actor pool;
- `metrics`: the metric definitions, exactly CLIP_benchmark's;
- `tasks`: from a set's embeddings to each task's metrics, and their MLflow names;
- `live`: the evaluation of a model in training, in the training worker.

No stage's driver is imported here: stages import this package, not each other.
"""
