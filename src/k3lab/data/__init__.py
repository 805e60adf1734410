"""Data: the embedded scene world, webdataset shard reading, batches."""
