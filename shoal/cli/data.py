"""``shoal data``: make, inspect and prepare datasets on disk."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from shoal.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data",
        help="make, inspect and prepare datasets on disk (Parquet)",
        description="Datasets on disk for --data parquet:PATH: write the built-in generators "
        "at any size, show what a dataset holds, or convert Parquet to memory-mapped Arrow.",
        epilog="example: shoal data make ctr --rows 20000000 --out data/ctr && "
        "shoal train --model ctr --strategy ps --data parquet:data/ctr",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    actions.required = True

    make = actions.add_parser(
        "make",
        help="write a built-in dataset (ctr, linear, text, clicks) as Parquet, any size",
        description="Write NAME with --rows training rows to OUT/train and a held-out "
        "OUT/test, in bounded memory. ctr: Criteo-like clicks (13 dense count columns, 26 "
        "hashed categorical ones) from a known logistic model, whose probabilities the test "
        "rows keep (true_prob) so AUC has a reference; linear: y = x.w + b + noise with the "
        "true w stored; text: the shipped text as windows of --context characters; clicks: "
        "a click log split by columns, OUT/user (id, user features) and OUT/item (id, item "
        "features, click) from a known bilinear model, each party holding --overlap of it.",
        epilog="example: shoal data make ctr --rows 1000000 --out data/ctr",
    )
    make.add_argument(
        "name",
        choices=("ctr", "linear", "text", "clicks"),
        help="the generator "
        "(clicks: a click log split by columns between a user and an item party)",
    )
    make.add_argument("--rows", type=_count, required=True, help="training rows")
    make.add_argument("--out", required=True, metavar="DIR", help="a new directory")
    make.add_argument("--test-rows", type=_count, help="held-out rows (default: rows/10, "
                      "between 1,000 and 100,000)")  # fmt: skip
    make.add_argument("--seed", type=_count, default=1234, help="generator seed (default 1234)")
    make.add_argument("--file-rows", type=_count, default=1 << 20,
                      help="rows per file (default 1048576)")  # fmt: skip
    make.add_argument("--compression", default="snappy", choices=("snappy", "zstd", "gzip", "none"),
                      help="default snappy")  # fmt: skip
    make.add_argument("--features", type=_count, help="linear: columns of x (default 32)")
    make.add_argument("--noise", type=float, help="linear: label noise (default 0.1)")
    make.add_argument("--context", type=_count, help="text: tokens per row (default 64)")
    make.add_argument("--overlap", type=float,
                      help="clicks: share of the samples each party holds (default 1)")  # fmt: skip
    make.set_defaults(run=run_make)

    info = actions.add_parser(
        "info",
        help="rows, columns, files, size and digest of a dataset",
        description="Show what PATH (a Parquet file, a directory of them, or a prepared "
        "directory) holds, reading only the files' footers; --verify also reads every "
        "byte of a prepared directory against its checksums.",
    )
    info.add_argument("path", metavar="PATH")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument(
        "--verify", action="store_true", help="check a prepared directory's checksums"
    )
    info.set_defaults(run=run_info)

    prep = actions.add_parser(
        "prepare",
        help="convert Parquet to memory-mapped Arrow files with an index and checksums",
        description="Rewrite SRC (as --data parquet:SRC reads it, train/ and test/ included) "
        "as uncompressed Arrow IPC files under OUT, with shoal-index.json (rows and SHA-256 "
        "of each file). Training reads them memory-mapped: any row at the cost of its "
        "pages, so a full shuffle is cheap and the pages count as the kernel's cache, "
        "not as a worker's private memory.",
        epilog="example: shoal data prepare data/ctr --out data/ctr-arrow",
    )
    prep.add_argument("src", metavar="SRC")
    prep.add_argument("--out", required=True, metavar="DIR", help="a new directory")
    prep.set_defaults(run=run_prepare)


def _count(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


class _Bar:
    """A rich progress bar on a terminal, nothing otherwise."""

    def __init__(self, total: int, what: str) -> None:
        self.bar = None
        if sys.stderr.isatty():
            from rich.progress import Progress

            self.bar = Progress(transient=True)
            self.task = self.bar.add_task(what, total=total)
            self.bar.start()

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


MAKE_OPTIONS = {"features": "linear", "noise": "linear", "context": "text", "overlap": "clicks"}
"""The generator each option of ``shoal data make`` belongs to."""


def run_make(args: argparse.Namespace) -> int:
    from shoal.data.make import default_test_rows, make

    if args.rows < 1:
        raise UserError("--rows must be at least 1")
    out = Path(args.out)
    test_rows = args.test_rows if args.test_rows is not None else default_test_rows(args.rows)
    opts = {k: getattr(args, k) for k in MAKE_OPTIONS if getattr(args, k) is not None}
    for key in opts:
        if args.name != MAKE_OPTIONS[key]:
            raise UserError(f"--{key} is an option of {MAKE_OPTIONS[key]}, not of {args.name}")
    bar = _Bar(args.rows + test_rows, f"shoal data make {args.name}")
    try:
        meta = make(args.name, args.rows, out, seed=args.seed, test_rows=test_rows,
                    file_rows=max(1, args.file_rows), compression=args.compression,
                    options=opts, progress=bar)  # fmt: skip
    finally:
        bar.close()
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {args.name}: {meta['rows']:,} training rows, {meta['test_rows']:,} test rows, "
          f"{_human(size)} in {out}")  # fmt: skip
    if args.name == "clicks":
        print(f"parties: user ({out / 'user'}), item with the label ({out / 'item'})")
    else:
        print(f"train with: --data parquet:{out}")
    return 0


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def describe(root: Path) -> dict[str, Any]:
    """What ``shoal data info`` shows, for one split directory or file."""
    from shoal.data.files import Files

    files = Files(root)
    schema = files.schemas[0]
    digest = hashlib.sha256()
    for name, fp in sorted(files.fingerprint().items()):
        digest.update(f"{name}\0{fp}\n".encode())
    return {
        "path": str(root),
        "format": "arrow (prepared)" if files.prepared else "parquet",
        "rows": files.rows,
        "files": len(files.shards),
        "blocks": len(files.blocks),
        "bytes": sum(s.size for s in files.shards),
        "columns": {name: str(schema.field(name).type) for name in schema.names},
        "digest": digest.hexdigest()[:32],
        "shoal": {k: v for k, v in files.metadata.items() if k not in ("true_weights", "vocab")},
    }


def _splits(root: Path) -> list[tuple[str, Path]]:
    from shoal.data.files import INDEX

    if root.is_dir() and (root / "train").is_dir() and not (root / INDEX).is_file():
        return [(s, root / s) for s in ("train", "test") if (root / s).is_dir()]
    return [("", root)]


def run_info(args: argparse.Namespace) -> int:
    root = Path(args.path)
    out = {name or "data": describe(path) for name, path in _splits(root)}
    if args.verify:
        for name, path in _splits(root):
            out[name or "data"]["verified"] = _verify(path)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for name, d in out.items():
        print(f"{name}: {d['path']} ({d['format']})")
        print(f"  rows {d['rows']:,} in {d['files']} files, {d['blocks']} row groups, "
              f"{_human(d['bytes'])}; digest {d['digest']}")  # fmt: skip
        cols = ", ".join(_runs(d["columns"]))
        print(f"  columns: {cols}")
        if d["shoal"]:
            meta = d["shoal"]
            features = ", ".join(_runs(dict.fromkeys(meta.get("features", []), "")))
            what = (f"label {meta.get('label')}, task {meta.get('task')}" if meta.get("label")
                    else "no label")  # fmt: skip
            party = (f" (party {meta['party']}, ids in {meta.get('id')})" if "party" in meta
                     else "")  # fmt: skip
            print(
                f"  written by shoal data make {meta.get('generator', '?')}{party}: "
                f"features {features}, {what}"
            )
        if "verified" in d:
            print(f"  checksums: {d['verified']}")
    return 0


def _runs(columns: dict[str, str]) -> list[str]:
    """``C1 int64, C2 int64, C3 int64`` shown as ``C1..C3 int64``."""
    import re

    out: list[str] = []
    run: list[str] = []
    prev: tuple[str, int, str] | None = None
    for name, kind in [*columns.items(), ("", "")]:
        m = re.fullmatch(r"(.*?)(\d+)", name)
        key = (m.group(1), int(m.group(2)), kind) if m else None
        if run and not (key and prev and key[0] == prev[0] and key[2] == prev[2]
                        and key[1] == prev[1] + 1):  # fmt: skip
            out.append(f"{run[0]}..{run[-1]} {prev[2]}" if len(run) > 2 else
                       ", ".join(f"{r} {prev[2]}" for r in run))  # fmt: skip
            run = []
        if key:
            run.append(name)
        elif name:
            out.append(f"{name} {kind}")
        prev = key
    return out


def _verify(root: Path) -> str:
    from shoal.data.files import Files

    files = Files(root)  # (the index's entries checked: files inside it, sizes, rows)
    if not files.prepared:
        return "none (not a prepared directory; Parquet files carry per-page CRCs at most)"
    files.verify()
    return "all match"


def run_prepare(args: argparse.Namespace) -> int:
    from shoal.data.files import Files

    src, out = Path(args.src), Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out}: not empty; shoal data prepare writes a new directory")
    splits = _splits(src)
    opened = [(name, Files(path)) for name, path in splits]  # every footer, before writing
    total = sum(f.rows for _, f in opened)
    bar = _Bar(total, "shoal data prepare")
    try:
        for name, files in opened:
            _prepare_split(files, out / name if name else out, bar)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # nothing half-written that looks whole
        raise
    finally:
        bar.close()
    print(f"prepared {total:,} rows in {out}; train with: --data parquet:{out}")
    return 0


def _prepare_split(files: Any, out: Path, progress: _Bar) -> None:
    import pyarrow as pa

    from shoal.data.files import INDEX, INDEX_FORMAT, sha256_file

    out.mkdir(parents=True, exist_ok=True)
    entries = []
    block = 0
    for i, shard in enumerate(files.shards):
        path = out / f"part-{i:05d}.arrow"
        schema = files.schemas[i]
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for _ in shard.blocks:
                if files.blocks and block < len(files.blocks):
                    table = files.read_block(block, schema.names)
                    for batch in table.combine_chunks().to_batches(
                        max_chunksize=table.num_rows or 1
                    ):
                        writer.write_batch(batch)
                    progress(table.num_rows)
                block += 1
        entries.append({"name": path.name, "rows": shard.rows, "size": path.stat().st_size,
                        "sha256": sha256_file(path), "source": shard.name,
                        "source_fingerprint": shard.fingerprint})  # fmt: skip
    tmp = out / (INDEX + ".tmp")
    tmp.write_text(json.dumps({"format": INDEX_FORMAT, "files": entries}, indent=1) + "\n")
    os.replace(tmp, out / INDEX)
