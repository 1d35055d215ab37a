"""A client process of a federation whose server runs elsewhere (``shoal federate``).

See :mod:`shoal.strategies.federated.remote` for the protocol. The process proves
it knows the job's secret, receives the job, and trains the clients the server
hands it; with secure aggregation it keeps each client's secrets and contribution
and answers the protocol's steps for them.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch
import zmq

from shoal import privacy, secagg
from shoal.config import loads_toml
from shoal.errors import PeerLost, UserError
from shoal.metrics import CommCounter
from shoal.strategies.federated.local import contribution
from shoal.strategies.federated.remote import TARGET, WAIT_S, max_bytes
from shoal.strategies.ps import wire
from shoal.strategies.ps.client import Peer


def run_client(address: str, name: str, timeout_s: float = 300.0) -> int:
    """One client process: join the federation at ``address`` and train the clients it
    is handed until the server is done. Returns the number of client updates pushed."""
    from shoal.data import build_dataset
    from shoal.models import build_model
    from shoal.models.tasks import per_sample_loss
    from shoal.optim import build_optimizer
    from shoal.strategies import resolve
    from shoal.strategies.federated.local import train_client
    from shoal.strategies.federated.rounds import build_federation

    try:
        secret = wire.load_secret()
    except RuntimeError:
        raise UserError(f"shoal federate needs the job's secret in {wire.SECRET_ENV}, "
                        "the same as the server's") from None  # fmt: skip
    comm = CommCounter()
    ctx = zmq.Context.instance()
    peer = Peer(ctx, f"tcp://{address}", secret, name, comm, timeout_s=timeout_s,
                max_bytes=1 << 31, target=TARGET)  # fmt: skip
    pushed = 0
    try:
        header, _ = peer.call({"op": "join"})
        job = loads_toml(str(header.get("config", "")))
        resolve(job)
        torch.manual_seed(job.train.seed)
        data = build_dataset(job.data)
        model = build_model(job.model, data)
        params = [p for p in model.parameters() if p.requires_grad]
        numel = sum(p.numel() for p in params)
        peer.max_bytes = max_bytes(numel)
        optimizer = build_optimizer(params, job.optim)
        budget = privacy.budget(job.train)
        federation = build_federation(job, data, budget.enabled)
        mu = job.strategy.options.prox_mu
        secure = SecureClients(job.strategy.options.secure_agg, budget.clip if budget.enabled
                               else 0.0)  # fmt: skip

        def loss_fn(m: torch.nn.Module, batch: Any) -> torch.Tensor:
            return per_sample_loss(data.task, m(batch[0]), batch[1])

        while True:
            try:
                header, tensors = peer.call({"op": "work"}, timeout_s=timeout_s)
            except PeerLost:
                if pushed:  # the server finished and left
                    return pushed
                raise
            op = header.get("op")
            if op == "done":
                return pushed
            if op in ("share", "mask", "unmask"):
                reply, out = secure.step(header)
                peer.call(reply, out)
                continue
            if op != "train":
                time.sleep(min(1.0, float(header.get("seconds", WAIT_S))))
                continue
            r, cid = int(header["round"]), int(header["client"])
            work = federation.client_work(r, cid)
            for group in optimizer.param_groups:
                group["lr"] = float(header["lr"])
            batches = [data.rows.take(rows) for rows in work.batches]
            global_x = tensors[0].to(torch.float64)
            change, loss_sum, _ = train_client(model, params, optimizer, batches, loss_fn, mu,
                                               global_x)  # fmt: skip
            update = {"op": "update", "round": r, "client": cid, "loss_sum": float(loss_sum)}
            if secure.on:  # its keys; the change stays here, to be sent masked
                peer.call({**update, "keys": secure.keep(r, cid, change, work.examples)})
            else:
                peer.call(update, [change.contiguous()])
            pushed += 1
    finally:
        peer.close()


class SecureClients:
    """A client process's side of secure aggregation: the secrets and contributions of
    the clients it trained this round, and the protocol's steps for them."""

    def __init__(self, on: bool, clip: float) -> None:
        self.on, self.clip = on, clip
        self.round = -1
        self.held: dict[int, tuple[secagg.Client, np.ndarray]] = {}

    def keep(self, round_: int, cid: int, change: torch.Tensor, examples: int) -> list[str]:
        """Keep a trained client's contribution and new secrets; its public keys."""
        if round_ != self.round:
            self.round, self.held = round_, {}
        client = secagg.Client(cid)
        x = secagg.encode(contribution(change.cpu(), examples, self.clip).numpy())
        self.held[cid] = (client, x)
        keys = client.advertise()
        return [keys.c.hex(), keys.s.hex()]

    def step(self, header: dict) -> tuple[dict, list[torch.Tensor]]:
        """The server's request for a step of one client's protocol; the reply."""
        op, r, cid = header["op"], int(header["round"]), int(header["client"])
        client, x = self.held.get(cid, (None, None)) if r == self.round else (None, None)
        reply = {"op": {"share": "shares", "mask": "masked", "unmask": "answers"}[op],
                 "round": r, "client": cid}  # fmt: skip
        if client is None or x is None:
            return reply, []  # not a client of ours (the server counts it stale)
        if op == "share":
            keys = {int(u): secagg.Keys(bytes.fromhex(c), bytes.fromhex(s))
                    for u, (c, s) in header["keys"].items()}  # fmt: skip
            mail = client.share_keys(keys, [int(p) for p in header["peers"]])
            return {**reply, "mail": {str(v): m.hex() for v, m in mail.items()}}, []
        if op == "mask":
            client.receive({int(u): bytes.fromhex(m) for u, m in header["inbox"].items()})
            return reply, [torch.from_numpy(client.masked_input(x).view(np.int64))]
        answers = client.unmask(int(u) for u in header["sent"])
        return {**reply, "answers": {str(u): [k, format(v, "x")]
                                     for u, (k, v) in answers.items()}}, []  # fmt: skip


def client_name() -> str:
    """This process's name at the server."""
    return f"client-{os.uname().nodename}-{os.getpid()}"
