"""A client process of a federation whose server runs elsewhere (``shoal federate``).

See :mod:`shoal.strategies.federated.remote` for the protocol. The process proves
it knows the job's secret, receives the job, and trains the clients the server
hands it; with secure aggregation it keeps each client's secrets and contribution
and answers the protocol's steps for them.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

import numpy as np
import torch
import zmq

from shoal import privacy, secagg
from shoal.errors import PeerLost, UserError
from shoal.jobfile import loads_toml
from shoal.metrics import CommCounter
from shoal.net import wire
from shoal.net.peer import Peer
from shoal.strategies.federated import checks
from shoal.strategies.federated.local import contribution
from shoal.strategies.federated.remote import TARGET, WAIT_S, max_bytes


def run_client(
    address: str, name: str, timeout_s: float = 300.0, data_path: str = "",
    client: int | None = None,
) -> int:  # fmt: skip
    """One client process: join the federation at ``address`` and train the clients it
    is handed until the server is done. Returns the number of client updates pushed.

    With ``data_path`` (a federation with ``--partition files``), the process is client
    ``client`` and trains on the rows of its own Parquet data, which never leave this
    machine; the server hands it that client only, and weighs its update by the rows
    it reports."""
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
    try:
        peer = Peer(ctx, f"tcp://{address}", secret, name, comm, timeout_s=timeout_s,
                    max_bytes=1 << 31, target=TARGET)  # fmt: skip
    except PeerLost as e:
        raise UserError(f"no federation server answered at {address}: {e}") from None
    pushed = 0
    try:
        header, _ = peer.call({"op": "join"})
        job = loads_toml(str(header.get("config", "")))
        resolve(job)
        own = _own_data(job, data_path, client)
        torch.manual_seed(job.train.seed)
        data = build_dataset(job.data, check=own)
        model = build_model(job.model, data)
        params = [p for p in model.parameters() if p.requires_grad]
        numel = sum(p.numel() for p in params)
        peer.max_bytes = max_bytes(numel)
        optimizer = build_optimizer(params, job.optim)
        budget = privacy.budget(job.train)
        federation = build_federation(job, data, budget.enabled)
        if own:  # its rows: all of its own data
            assert client is not None
            federation.partitions[client] = np.arange(data.num_train)
        mu = job.strategy.options.prox_mu
        secure = SecureClients(job.strategy.options.secure_agg,
                               budget.clip if budget.enabled else 0.0, job.train.seed,
                               federation.clients)  # fmt: skip

        def loss_fn(m: torch.nn.Module, batch: Any) -> torch.Tensor:
            return per_sample_loss(data.task, m(batch[0]), batch[1])

        while True:
            try:
                ask = {"op": "work", **({"holds": client} if own else {})}
                header, tensors = peer.call(ask, timeout_s=timeout_s)
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
                wait = header.get("seconds")
                ok = isinstance(wait, float | int) and math.isfinite(wait)
                time.sleep(min(1.0, max(0.0, wait)) if ok else WAIT_S)
                continue
            r, cid, lr = header.get("round"), header.get("client"), header.get("lr")
            if not (type(r) is int and r >= 0 and type(cid) is int
                    and 0 <= cid < federation.clients
                    and isinstance(lr, float | int) and math.isfinite(lr) and lr > 0
                    and len(tensors) == 1 and tensors[0].dtype == torch.float64):  # fmt: skip
                raise UserError(f"the server at {address} sent a malformed task: "
                                f"{str(header)[:200]}")  # fmt: skip
            if tensors[0].numel() != numel:
                raise UserError(f"the server's model has {tensors[0].numel()} parameters, "
                                f"and the one built for this data {numel}: are the columns "
                                "the server's?")  # fmt: skip
            work = federation.client_work(r, cid)
            for group in optimizer.param_groups:
                group["lr"] = float(lr)
            batches = [data.rows.take(rows) for rows in work.batches]
            global_x = tensors[0]
            change, loss_sum, _ = train_client(model, params, optimizer, batches, loss_fn, mu,
                                               global_x)  # fmt: skip
            update = {"op": "update", "round": r, "client": cid, "loss_sum": float(loss_sum),
                      "examples": work.examples}  # fmt: skip
            if secure.on:  # its keys; the change (and the loss) stay here, to be masked
                try:
                    keys = secure.keep(r, cid, change, work.examples, float(loss_sum))
                except ValueError as e:
                    raise UserError(f"round {r + 1}, client {cid}: {e}") from None
                peer.call({**update, "loss_sum": 0.0, "keys": keys})
            else:
                peer.call(update, [change.contiguous()])
            pushed += 1
    except PeerLost as e:  # (after its first update: the server finished and left, above)
        raise UserError(f"the federation server at {address} stopped answering: {e}") from None
    finally:
        peer.close()


def _own_data(job: Any, data_path: str, client: int | None) -> bool:
    """Whether this process brings its own rows (``--data``); points ``job`` at them.
    A :class:`UserError` where the process and the federation disagree on it."""
    from shoal.data import partition

    opts = job.strategy.options
    files = partition.parse(opts.partition).kind == "files"
    if not data_path:
        if files:
            raise UserError("this federation's clients bring their own data (--partition "
                            "files): start shoal federate with --data PATH --client K")  # fmt: skip
        return False
    if not files:
        raise UserError(f"--data {data_path}: this federation deals the server's rows to its "
                        f"clients (--partition {opts.partition}); leave --data out")  # fmt: skip
    if client is None or not 0 <= client < opts.clients:
        raise UserError(f"--client must be one of the federation's clients, 0 to "
                        f"{opts.clients - 1}")  # fmt: skip
    job.data.name = data_path if data_path.startswith("parquet:") else f"parquet:{data_path}"
    return True


class SecureClients:
    """A client process's side of secure aggregation: the secrets and contributions of
    the clients it trained this round, and the protocol's steps for them. Everything the
    server sends is checked (:class:`shoal.secagg.Client` checks what the protocol
    requires of the server); a step that fails a check is refused, the client drops out
    of the round, and the process goes on."""

    def __init__(self, on: bool, clip: float, job_seed: int = 0, summands: int = 1) -> None:
        self.on, self.clip, self.job_seed, self.summands = on, clip, job_seed, summands
        self.round = -1
        self.held: dict[int, tuple[secagg.Client, np.ndarray]] = {}
        self.refused = 0

    def keep(
        self, round_: int, cid: int, change: torch.Tensor, examples: int, loss_sum: float
    ) -> list[str]:
        """Keep a trained client's contribution and new secrets; its public keys. The
        loss sum rides in the masked input too (last), so the server learns the round's
        loss, not a client's. A :class:`ValueError` for a contribution fixed point cannot
        hold (not finite)."""
        if round_ != self.round:
            self.round, self.held = round_, {}
        x = contribution(change.cpu(), examples, self.clip).numpy()
        x = np.append(x, loss_sum)
        client = secagg.Client(cid)
        self.held[cid] = (client, secagg.encode(x, self.summands))
        keys = client.advertise()
        return [keys.c.hex(), keys.s.hex()]

    def step(self, header: dict) -> tuple[dict, list[torch.Tensor]]:
        """The server's request for a step of one client's protocol; the reply (a refusal,
        with its reason, where the request fails a check)."""
        op = header.get("op")
        r, cid = header.get("round"), header.get("client")
        reply = {"op": {"share": "shares", "mask": "masked", "unmask": "answers"}[op],
                 "round": r, "client": cid}  # fmt: skip
        try:
            if type(r) is not int or type(cid) is not int:
                raise secagg.SecAggError("round and client must be integers")
            client, x = self.held.get(cid, (None, None)) if r == self.round else (None, None)
            if client is None or x is None:
                raise secagg.SecAggError(f"client {cid} of round {r} is not one of ours")
            return self._answer(op, header, r, client, x, reply)
        except (secagg.SecAggError, checks.Refused, ValueError, TypeError, KeyError) as e:
            self.refused += 1
            why = f"{type(e).__name__}: {e}" if not isinstance(e, secagg.SecAggError) else str(e)
            print(f"shoal federate: refused the server's {op} for client {cid}: {why[:200]}",
                  file=sys.stderr, flush=True)  # fmt: skip
            return {**reply, "refused": why[:200]}, []

    def _answer(self, op: str, header: dict, r: int, client: secagg.Client, x: np.ndarray,
                reply: dict) -> tuple[dict, list[torch.Tensor]]:  # fmt: skip
        if op == "share":
            keys = {u: secagg.Keys(*(checks.hex_bytes(k, checks.KEY_BYTES, "a key") for k in pair))
                    for u, pair in checks.ids_dict(header["keys"], "keys").items()}  # fmt: skip
            peers = [checks.integer(v, "a peer") for v in header["peers"]]
            graph = secagg.graph_seed(self.job_seed, r)
            mail = client.share_keys(keys, peers, graph)
            return {**reply, "mail": {str(v): m.hex() for v, m in mail.items()}}, []
        if op == "mask":
            inbox = {u: checks.hex_bytes(m, checks.BLOB_BYTES, "a shares blob")
                     for u, m in checks.ids_dict(header["inbox"], "inbox").items()}  # fmt: skip
            client.receive(inbox)
            return reply, [torch.from_numpy(client.masked_input(x).view(np.int64))]
        answers = client.unmask(checks.integer(u, "an input's client") for u in header["sent"])
        return {**reply, "answers": {str(u): [k, format(v, "x")]
                                     for u, (k, v) in answers.items()}}, []  # fmt: skip


def client_name() -> str:
    """This process's name at the server."""
    return f"client-{os.uname().nodename}-{os.getpid()}"
