"""`uses: crawl`: URL lists in, Parquet shards of fetched and resized images out, every row accounted for."""
