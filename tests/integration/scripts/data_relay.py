"""Two ranks of one tensor-parallel group read RLP data through the relay (gloo).

    python data_relay.py --rank R --store FILE --shards SPEC --server URL --out FILE

Phase 1 reads contexts to the end of one epoch; rank 0 then asks the test's HTTP server how
often each file was requested. Phase 2 reads a few NTP batches. Each rank writes what it got.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request

import torch.distributed as dist

from rlp.config import DataConfig
from rlp.data.stream import RLPDataStream


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    for name in ("--store", "--shards", "--server", "--out"):
        p.add_argument(name, required=True)
    p.add_argument("--rank", type=int, required=True)
    args = p.parse_args(argv)
    dist.init_process_group(
        "gloo", init_method=f"file://{args.store}", rank=args.rank, world_size=2
    )
    group = dist.new_group([0, 1])
    cfg = DataConfig(
        shards=args.shards,
        shuffle_buffer=8,
        min_prefix_tokens=4,
        max_prefix_tokens=64,
        ntp_seq_len=32,
    )
    stream = RLPDataStream(
        cfg.shards, cfg, dp_rank=0, dp_size=1, seed=3, target_tokens=1, max_epochs=1, tp_group=group
    )
    contexts = []
    while batch := stream.next_contexts(5):
        contexts += [[c.key, c.position, c.prefix, c.target] for c in batch]
    requests = None
    if args.rank == 0:
        with urllib.request.urlopen(f"{args.server}/__requests__") as r:
            requests = json.load(r)
    dist.barrier()
    ntp = [[t.tolist() for t in stream.next_ntp_batch(2)] for _ in range(3)]
    out = {
        "contexts": contexts,
        "ntp": ntp,
        "requests": requests,
        "stats": stream.stats(),
        "state": stream.state_dict(),
    }
    with open(args.out, "w") as f:
        json.dump(out, f)
    stream.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
