"""``--strategy local-sgd`` and ``diloco``: their checks, refusals and summary rows
(the options are :class:`~shoal.strategies.periodic.strategy.LocalSGDConfig` and
:class:`~shoal.strategies.periodic.strategy.DiLoCoConfig`)."""

from __future__ import annotations

from typing import Any

from shoal import balance
from shoal.config import JobConfig
from shoal.errors import UserError
from shoal.strategies import plugin
from shoal.strategies.periodic.strategy import DiLoCo, DiLoCoConfig, LocalSGD, LocalSGDConfig


class LocalSGDPlugin(plugin.Plugin):
    name = "local-sgd"
    description = "local SGD: workers step alone, parameters averaged every --sync-every steps"
    Config = LocalSGDConfig
    runtime = LocalSGD
    balance_modes = ("equal", "static", "auto")
    micro_batching = True
    recovers_in_place = True
    codec_rolls_back = True  # (the codec's state is kept with each point gone back to)
    reads = (*plugin.Plugin.reads, *plugin.IN_PLACE_READS)

    def commits_every(self, job: JobConfig) -> int:
        opts = self.options(job)
        if _streaming(opts):  # the replicas are one model only where they meet in full
            return opts.meet_every or job.train.checkpoint_every or 1 << 30
        return opts.sync_every

    def in_place_refusal(self, job: JobConfig) -> str:
        opts = self.options(job)
        if _streaming(opts) and not (job.train.checkpoint_every or opts.meet_every):
            return (
                "--recovery inplace with --fragments or --overlap goes back to where the "
                "replicas last met in full: set --meet-every or --checkpoint-every (a "
                "multiple of --sync-every), or it would go back to the start"
            )
        return ""

    def summary_rows(self, summary: dict[str, Any]) -> list[tuple[str, str]]:
        sync = summary.get("synchronization")
        if not sync:
            return []
        per = [b for b in sync["bytes_per_sync"] if b is not None]
        util = [u for u in sync["compute_utilisation"] if u is not None]
        hidden, took = sum(sync["hidden_seconds"]), sum(sync["sync_seconds"])
        return [
            (
                "synchronization",
                f"{sync['fragments']} fragment(s), overlap {sync['overlap']}, "
                f"{sync['codec']}, {sync['syncs']:,} exchanges, "
                f"{sync.get('meetings', 0):,} full meeting(s)"
                + (f" (every {sync['meet_every']})" if sync.get("meet_every") else ""),
            ),
            ("bytes per exchange", f"{min(per) / 1e6:.3g}-{max(per) / 1e6:.3g} MB" if per else "-"),
            ("exchange time hidden", f"{hidden:.1f} of {took:.1f} s (all workers)"),
            (
                "compute utilisation",
                f"{min(util):.2f}-{max(util):.2f} (per worker)" if util else "-",
            ),
        ]

    def check(self, job: JobConfig) -> None:
        """Checkpoints and meetings fall on synchronizations, where the replicas are one
        model; the streaming schedule fits in --sync-every."""
        super().check(job)
        opts = self.options(job)
        every, h = job.train.checkpoint_every, opts.sync_every
        if every % h:
            raise UserError(
                f"--checkpoint-every {every} must be a multiple of --sync-every {h} with "
                f"--strategy {self.name}: between synchronizations the replicas differ"
            )
        f, meet = opts.fragments, opts.meet_every
        if meet and not _streaming(opts):
            raise UserError(
                f"--meet-every {meet} is for streaming (--fragments or --overlap): without "
                "it the replicas meet in full at every synchronization"
            )
        if meet % h:
            raise UserError(f"--meet-every {meet} must be a multiple of --sync-every {h}")
        if meet and every % meet:
            raise UserError(
                f"--checkpoint-every {every} must be a multiple of --meet-every {meet}: "
                "the replicas meet in full at every checkpoint"
            )
        if f > 1 and balance.parse(job.train.balance).mode != "equal":
            raise UserError(
                f"--fragments {f} runs with --balance equal: each fragment would be weighed "
                "by the samples since it last met"
            )
        if h % f:
            raise UserError(
                f"--fragments {f} must divide --sync-every {h}: one fragment meets every H/F steps"
            )
        if opts.overlap > h // f:
            raise UserError(
                f"--overlap {opts.overlap} must be at most --sync-every / --fragments = "
                f"{h // f}: a fragment's exchange lands before the next one starts"
            )


class DiLoCoPlugin(LocalSGDPlugin):
    name = "diloco"
    description = (
        "DiLoCo: inner --optimizer (adamw, --lr 0.003) for --sync-every steps, "
        "outer Nesterov SGD on the averaged change"
    )
    Config = DiLoCoConfig
    runtime = DiLoCo
    default_optimizer = "adamw"
    default_lr = 0.003


def _streaming(opts: LocalSGDConfig) -> bool:
    """Whether the job syncs fragments on a staggered schedule or in the background."""
    return opts.fragments > 1 or opts.overlap > 0
