"""Thin entry point: ``python -m data_pipelines.demo_corpus`` = ``rlp data demo``.

The demo corpus builder lives in :mod:`rlp.data.demo` (installed with the package).
"""

from rlp.data.demo import main

if __name__ == "__main__":
    raise SystemExit(main())
