"""Read RLP contexts from shard URLs, persisting (contexts so far, data cursor) after each one.

    python stream_http.py --shards SPEC --out FILE [--resume] [--delay S] [--workers N]

Each context is recorded as ``[document key, position]``; FILE is replaced atomically after
every context, so a kill -9 at any moment leaves a consistent record. ``--resume`` continues from
FILE's cursor. The stream ends after one epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from rlp.config import DataConfig
from rlp.data.stream import RLPDataStream


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shards", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--workers", type=int, default=0)
    args = p.parse_args(argv)
    cfg = DataConfig(
        shards=args.shards,
        num_workers=args.workers,
        shuffle_buffer=0,
        min_prefix_tokens=4,
        max_prefix_tokens=64,
        ntp_seq_len=32,
    )
    stream = RLPDataStream(
        cfg.shards, cfg, dp_rank=0, dp_size=1, seed=7, target_tokens=1, max_epochs=1
    )
    seen: list[list] = []
    if args.resume:
        with open(args.out) as f:
            saved = json.load(f)
        seen = saved["contexts"]
        stream.load_state_dict(saved["cursor"])
    while True:
        batch = stream.next_contexts(1)
        if not batch:
            break
        seen.append([batch[0].key, batch[0].position])
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"contexts": seen, "cursor": stream.state_dict()}, f)
        os.replace(tmp, args.out)
        time.sleep(args.delay)
    stream.close()


if __name__ == "__main__":
    main(sys.argv[1:])
