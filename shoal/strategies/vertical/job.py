"""What every process of a vertical job reads from the job alike: the parties, the
label party, each party's directory, the plan all parties must share, the steps
where they all stop, each part's seed, and where the label party listens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from shoal.config import JobConfig
from shoal.errors import UserError
from shoal.net import wire

PARTY_ENV = "SHOAL_PARTY"
"""Which party a process of a one-machine vertical job is (its launcher sets it)."""
ADDRESS_ENV = "SHOAL_VERTICAL_ADDRESS"
"""Where each process of the label party listens, in a one-machine job (comma-separated,
by rank: its launcher picks the ports)."""


def parse_parties(text: str) -> dict[str, str]:
    """``--parties user=PATH,item=PATH`` as ``{name: path}`` ("" where only the name is
    given: a party on another machine)."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, path = part.partition("=")
        name = name.strip()
        if not name.isidentifier():
            raise UserError(f"--parties: {name!r} is not a party name (letters, digits, _)")
        if name in out:
            raise UserError(f"--parties names {name} twice")
        out[name] = path.strip()
    if len(out) < 2:
        raise UserError("--parties needs two parties or more: NAME=PATH,NAME=PATH")
    return out


def label_of(opts: Any, parties: dict[str, str]) -> str:
    """The label party: ``--label-party``, else the last of ``--parties``."""
    label = opts.label_party or list(parties)[-1]
    if label not in parties:
        raise UserError(f"--label-party {label} is not one of --parties ({', '.join(parties)})")
    return label


def party_home(job: JobConfig, name: str) -> Path:
    """The directory of party ``name``'s own files (checkpoints, its part of the model)."""
    opts = job.strategy.options
    out = Path(job.output.out)
    if opts.party or name == label_of(opts, parse_parties(opts.parties)):
        return out
    return out / "parties" / name


def plan_of(job: JobConfig) -> dict[str, Any]:
    """What every party must agree on (compared when they meet: one ``shoal train`` per
    machine may be given different flags)."""
    t, o = job.train, job.strategy.options
    return {
        "steps": t.steps, "epochs": t.epochs, "batch_size": t.batch_size, "seed": t.seed,
        "eval_every": t.eval_every, "checkpoint_every": t.checkpoint_every,
        "staleness": o.staleness, "split_model": o.split_model, "hidden": o.bottom_hidden,
        "dim": o.tower_dim, "optimizer": job.optim.name, "lr": job.optim.lr,
        "schedule": job.optim.schedule, "warmup": job.optim.warmup_steps, "align": o.align,
        "parties": list(parse_parties(o.parties)), "party_workers": o.party_workers,
    }  # fmt: skip


def seeded(seed: int, index: int) -> None:
    """Each part's initial weights from its own seed: party ``index``'s bottom
    (``index`` in ``--parties`` order; -1: the top), the same however parties are run."""
    torch.manual_seed(seed * 1_000_003 + index + 1)


def boundaries(job: JobConfig, total: int) -> set[int]:
    """Steps where every party stops together: checkpoints, evaluations, the end."""
    t = job.train
    out = {total}
    for every in (t.checkpoint_every, t.eval_every):
        if every:
            out |= set(range(every, total, every))
    return out


def secret() -> bytes:
    hex_ = wire.secret_hex()
    if not hex_:
        raise UserError(
            "--strategy vertical with --party needs SHOAL_SECRET, the same on every party "
            "(e.g. export SHOAL_SECRET=$(openssl rand -hex 32))"
        )
    return bytes.fromhex(hex_)


def address(given: str, label_address: str, rank: int) -> str:
    """Where process ``rank`` of the label party listens: the launcher's list (one
    machine), else ``--label-address HOST:PORT`` plus the rank (PORT, PORT+1, ...)."""
    if given:
        return given.split(",")[rank]
    host, _, port = label_address.rpartition(":")
    return f"tcp://{host}:{int(port) + rank}"


def stored_label(path: str) -> str:
    from shoal.data.files import Files, split_roots

    meta = Files(split_roots(path)[0]).metadata
    label = str(meta.get("label", ""))
    if not label:
        raise UserError(f"{path}: the label party's data names no label column: give "
                        "--label-column")  # fmt: skip
    return label
