"""Offline data preparation: shard builder and the bundled demo corpus.

* :mod:`data_pipelines.build_shards` - text/jsonl/parquet/HF dataset -> tokenised webdataset
  shards + ``manifest.json`` (``rlp data build``).
* :mod:`data_pipelines.demo_corpus` - the small offline demo corpus, its tokenizer and shards
  (``rlp data demo``).

These scripts depend on ``rlp.data.format`` (the shard format) and ``rlp.tokenizer``; nothing in
``rlp`` imports them except the CLI and the trainer's ``data.build_demo_if_missing``.
"""
