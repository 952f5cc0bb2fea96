"""Thin entry point: ``python -m data_pipelines.build_shards`` = ``rlp data build``.

The builder lives in :mod:`rlp.data.builder` (installed with the package).
"""

from rlp.data.builder import main

if __name__ == "__main__":
    raise SystemExit(main())
