"""Command-line wrappers for offline data preparation (the code lives in :mod:`rlp.data`).

* ``python -m data_pipelines.build_shards`` = ``rlp data build`` (:mod:`rlp.data.builder`).
* ``python -m data_pipelines.demo_corpus`` = ``rlp data demo`` (:mod:`rlp.data.demo`).
"""
