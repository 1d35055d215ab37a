"""shoal's loader vs torchdata's StatefulDataLoader and Hugging Face datasets, on the
same Parquet files: samples/s, private memory, and samples duplicated or missed when
a 4-worker epoch is killed after a checkpoint and resumed on 3 workers.

    python -m bench.loaders --rows 2000000 --features 64 --reps 3

Each throughput measurement is a fresh process reading worker 0's share of 4
(global batch 1024, so 256 rows a step) for ``--steps`` steps or 60 s, features
and labels as tensors, alternating the loaders rep by rep:

* shoal: GlobalBatchSampler (block shuffle over the row groups) + DiskRows.
* torchdata: StatefulDataLoader(batch_size=256) with DistributedSampler over a
  map-style dataset whose ``__getitems__`` reads the rows with the same pyarrow
  reader (row-group cache included): only the order and the sharding differ.
* HF datasets: load_dataset("parquet", streaming=True), split_dataset_by_node,
  shuffle(buffer_size=10000), batched by 256 with torch formatting.
* shoal/arrow, torchdata/arrow: the first two on the same rows prepared as
  memory-mapped Arrow (``shoal data prepare``), where any row is cheap to reach:
  shoal takes a full shuffle there, and DistributedSampler's random rows stop
  costing a row group each.

The resume check trains nothing: it follows sample ids only. Four workers
consume 40% of an epoch, a checkpoint (each loader's state_dict) is taken at
30%, the job dies; three workers resume from the checkpoint (loading the states
of old workers 0-2, what the APIs allow) and finish the epoch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

GLOBAL = 1024
W = 4


def write_data(root: Path, rows: int, features: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per_file, group = 1 << 19, 1 << 16
    for f, start in enumerate(range(0, rows, per_file)):
        n = min(per_file, rows - start)
        x = rng.standard_normal((n, features), dtype=np.float32)
        table = pa.table({
            "id": np.arange(start, start + n, dtype=np.int64),
            "x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), features),
            "y": x[:, 0].copy(),
        })  # fmt: skip
        pq.write_table(table, root / f"part-{f:05d}.parquet", row_group_size=group)


# --- the three loaders: an iterator of (ids, x, y) batches for one rank --------------------


def shoal_loader(root: Path, rank: int, world: int, state: dict | None = None):
    from shoal.config import DataConfig
    from shoal.data import GlobalBatchSampler, build_dataset, build_order

    cfg = DataConfig(name=f"parquet:{root}", features="x", label="y", cache_mb=256)
    data = build_dataset(cfg)
    sampler = GlobalBatchSampler(data.num_train, GLOBAL, rank, world, seed=0,
                                 order=build_order(data, cfg, 0))  # fmt: skip
    if state is not None:
        sampler.load_state_dict(state)

    def batches():
        while sampler.epoch == 0:
            idx, _ = sampler.next_batch()
            x, y = data.rows.take(idx)
            yield idx, x, y

    return batches(), sampler.state_dict


class _RowsDataset:
    """Map-style dataset over the Parquet rows (torchdata reads through it)."""

    def __init__(self, root: Path) -> None:
        from shoal.config import DataConfig
        from shoal.data import build_dataset

        self.data = build_dataset(DataConfig(name=f"parquet:{root}", features="x", label="y",
                                             cache_mb=256))  # fmt: skip

    def __len__(self) -> int:
        return self.data.num_train

    def __getitems__(self, idx: list[int]):
        ids = np.asarray(idx, dtype=np.int64)
        x, y = self.data.rows.take(ids)
        return [(ids, x, y)]

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]


def torchdata_loader(root: Path, rank: int, world: int, state: dict | None = None):
    from torch.utils.data.distributed import DistributedSampler
    from torchdata.stateful_dataloader import StatefulDataLoader

    ds = _RowsDataset(root)
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = StatefulDataLoader(ds, batch_size=GLOBAL // W, sampler=sampler,
                                collate_fn=lambda b: b[0], num_workers=0)  # fmt: skip
    if state is not None:
        loader.load_state_dict(state)
    return iter(loader), loader.state_dict


def hf_loader(root: Path, rank: int, world: int, state: dict | None = None):
    from datasets import load_dataset
    from datasets.distributed import split_dataset_by_node

    files = sorted(str(p) for p in root.glob("*.parquet"))
    ds = load_dataset("parquet", data_files={"train": files}, split="train", streaming=True)
    ds = split_dataset_by_node(ds, rank=rank, world_size=world).shuffle(seed=0, buffer_size=10_000)
    ds = ds.with_format("torch")
    if state is not None:
        ds.load_state_dict(state)

    def batches():
        for b in ds.iter(batch_size=GLOBAL // W):
            yield b["id"].numpy(), b["x"], b["y"]

    return batches(), ds.state_dict


def _arrow(loader):
    """The same loader on the files prepared as memory-mapped Arrow (``ROOT-arrow``)."""

    def on_arrow(root: Path, rank: int, world: int, state: dict | None = None):
        return loader(root.with_name(root.name + "-arrow"), rank, world, state)

    return on_arrow


LOADERS = {
    "shoal": shoal_loader,
    "torchdata": torchdata_loader,
    "hf-datasets": hf_loader,
    "shoal/arrow": _arrow(shoal_loader),
    "torchdata/arrow": _arrow(torchdata_loader),
}


# --- measurements -----------------------------------------------------------------------


def throughput(name: str, root: Path, steps: int, limit_s: float = 60.0) -> dict:
    """In this (fresh) process: worker 0 of 4 reads ``steps`` batches (or for
    ``limit_s`` seconds, if that comes first)."""
    from shoal.memory import private_bytes

    it, _ = LOADERS[name](root, 0, W)
    next(it)  # opening, first reads
    start, n = time.perf_counter(), 0
    for _, (ids, _x, _y) in zip(range(steps), it):
        n += len(ids)
        if time.perf_counter() - start > limit_s:
            break
    elapsed = time.perf_counter() - start
    return {"samples_per_s": n / elapsed, "private_mb": private_bytes() / 2**20}


def resume_accounting(name: str, root: Path, rows: int) -> dict:
    """Ids consumed in an epoch killed on 4 workers and resumed on 3 from a checkpoint."""
    steps_per_rank = rows // GLOBAL
    ckpt, kill = int(0.3 * steps_per_rank), int(0.4 * steps_per_rank)
    kept: list[np.ndarray] = []
    states = []
    if name == "shoal":  # one sampler state is the whole job's position
        its = [LOADERS[name](root, r, W) for r in range(W)]
        for step in range(kill):
            for it, _ in its:
                ids = next(it)[0]
                if step < ckpt:
                    kept.append(ids)
            if step == ckpt - 1:
                states = [its[0][1]()] * 3
    else:
        its = [LOADERS[name](root, r, W) for r in range(W)]
        for step in range(kill):
            for it, _ in its:
                ids = next(it)[0]
                if step < ckpt:
                    kept.append(np.asarray(ids))
            if step == ckpt - 1:
                states = [its[r][1]() for r in range(3)]  # old workers 0-2; 3's is lost
    for r in range(3):  # resume on 3 workers to the end of the epoch
        it, _ = LOADERS[name](root, r, 3, states[r])
        for ids, _, _ in it:
            kept.append(np.asarray(ids))
    seen = Counter(np.concatenate(kept).tolist())
    return {"duplicated": sum(c - 1 for c in seen.values()), "missed": rows - len(seen)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--steps", type=int, default=400, help="batches per throughput measurement")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--data", help="existing directory (written by this bench) to reuse")
    p.add_argument("--resume-rows", type=int, default=200_000,
                   help="rows of the (smaller) dataset the resume check follows")  # fmt: skip
    p.add_argument(
        "--measure", nargs=3, metavar=("LOADER", "ROOT", "STEPS"), help=argparse.SUPPRESS
    )
    args = p.parse_args()
    if args.measure:
        name, root, steps = args.measure
        print(json.dumps(throughput(name, Path(root), int(steps))))
        return
    tmp = Path(tempfile.mkdtemp(prefix="shoal-bench-loaders-"))
    root = Path(args.data) if args.data else tmp / "data"
    if not args.data:
        write_data(root, args.rows, args.features)
    arrow = root.with_name(root.name + "-arrow")
    if not arrow.exists():
        subprocess.run([sys.executable, "-m", "shoal", "data", "prepare", str(root), "--out",
                        str(arrow)], check=True, capture_output=True)  # fmt: skip
    size = sum(f.stat().st_size for f in root.glob("*.parquet"))
    print(f"data: {args.rows:,} rows x {args.features} features, {size / 2**30:.2f} GiB in {root}",
          flush=True)  # fmt: skip
    results: dict[str, list[dict]] = {n: [] for n in LOADERS}
    for rep in range(args.reps):
        names = list(LOADERS) if rep % 2 == 0 else list(reversed(LOADERS))
        for name in names:
            cmd = [sys.executable, "-m", "bench.loaders", "--measure", name, str(root),
                   str(args.steps)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    small = tmp / "small"
    write_data(small, args.resume_rows, 8)
    subprocess.run([sys.executable, "-m", "shoal", "data", "prepare", str(small), "--out",
                    str(tmp / "small-arrow")], check=True, capture_output=True)  # fmt: skip
    print(f"{'loader':12} {'samples/s (worker 0 of 4)':>26} {'private MiB':>12} "
          f"{'dup after 4->3':>15} {'missed':>8}")  # fmt: skip
    for name in LOADERS:
        rate = statistics.median(r["samples_per_s"] for r in results[name])
        mem = statistics.median(r["private_mb"] for r in results[name])
        acct = resume_accounting(name, small, args.resume_rows)
        print(f"{name:12} {rate:>26,.0f} {mem:>12.0f} {acct['duplicated']:>15,} "
              f"{acct['missed']:>8,}")  # fmt: skip


if __name__ == "__main__":
    main()
