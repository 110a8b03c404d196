"""`uses: curate`: crawled shards in; curated shards and a ledger of every row's decision out."""
