"""The feature cache: SigLIP features of every unique image, keyed by the SHA-256 of its bytes.

plan.py    BuildConfig (what a build is asked to do) and Plan (the unique keys cut into shards)
build.py   plan, encode this process's shards, finalize the index and manifest
encode.py  the encoder loop: decode in workers, the tower on the device, writes in a thread
writer.py  crash-safe shard writing and the build lock
reader.py  FeatureCache (key -> features, memory-mapped), verify, the training-time check
cli.py     vlm-cache build | finalize | verify | info
"""
