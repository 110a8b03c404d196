"""The ingest stage: an image-text dataset that already exists (Parquet, webdataset, a built-in) as crawled shards."""
