"""`deepclust label`: resumable, shardable labelling of a folder, and its HTML cluster gallery."""
