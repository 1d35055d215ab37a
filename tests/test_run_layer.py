"""The run layer, in process: a job resolved without argparse, every setting the job does
not read refused (or, from a job file, warned about), the shared checks no plugin can
skip, and the engines' entry points free of the command line."""

from __future__ import annotations

import argparse
import dataclasses
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shoal.config import JobConfig, flag_of, public_fields
from shoal.data import DATASETS, data_reads
from shoal.errors import UserError
from shoal.models import MODELS
from shoal.run.resolve import Request, resolve_job
from shoal.strategies import BUILTIN

pytestmark = pytest.mark.timeout(60)


def _resolve(tmp_path, given=None, config=None):
    given = {"output.out": str(tmp_path / "run"), **(given or {})}
    return resolve_job(Request(config=config, given=given))


def _refused(tmp_path, given, flag, config=None) -> str:
    with pytest.raises(UserError) as e:
        _resolve(tmp_path, given, config)
    line = str(e.value)
    assert "\n" not in line and flag in line, (flag, line)
    return line


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pq")
    x = [float(i % 7) for i in range(256)]
    pq.write_table(pa.table({"f0": x, "y": [2 * v for v in x]}), root / "part-0.parquet")
    return f"parquet:{root}"


def _unread_setup(section: str, f: dataclasses.Field, parquet: str) -> dict:
    """Values that make a job that does not read ``section.f``, from its declaration."""
    reader, when = f.metadata.get("reader"), f.metadata.get("when")
    if reader == "model":
        return {"model.name": next(n for n, m in MODELS.items() if f.name not in m.reads)}
    if reader == "data":
        names = [*DATASETS, parquet]
        return {"data.name": next(n for n in names if f.name not in data_reads(n))}
    if reader == "strategy":
        key = f"{section}.{f.name}"
        return {"strategy.name": next(n for n, p in BUILTIN.items() if key not in p.reads)}
    assert when, f.name
    name, op, values = when, "", ""
    for sep in ("!=", "="):
        if sep in when:
            name, _, values = when.partition(sep)
            op = sep
            break
    other = getattr(JobConfig(), section)
    of = {g.name: g for g in public_fields(other)}[name]
    default = getattr(other, name)
    if op == "=" and str(default) in values.split("|"):
        choices = of.metadata.get("choices")
        value = next(c for c in choices if c not in values.split("|")) if choices else 10
        return {f"{section}.{name}": value}
    return {}  # (the default leaves it unread)


def test_every_declared_setting_is_refused_where_the_job_does_not_read_it(tmp_path, parquet_dir):
    """Walks every field that declares who reads it (``reader``) or when (``when``):
    given by name in a job that does not read it, it is one line naming the flag."""
    walked = 0
    for section in dataclasses.fields(JobConfig):
        for f in public_fields(getattr(JobConfig(), section.name)):
            if not ({"reader", "when"} & f.metadata.keys()):
                continue
            setup = _unread_setup(section.name, f, parquet_dir)
            value = getattr(getattr(JobConfig(), section.name), f.name)
            given = {**setup, f"{section.name}.{f.name}": value}
            _refused(tmp_path, given, flag_of(f))
            walked += 1
    for plugin in BUILTIN.values():
        for f in dataclasses.fields(plugin.Config):
            when = f.metadata.get("when")
            if not when:
                continue
            given = {
                "strategy.name": plugin.name,
                f"option.{f.name}": getattr(plugin.Config(), f.name),
            }
            if "!=" in when:  # read unless NAME is VALUE: give it that value
                name, _, value = when.partition("!=")
                given[f"option.{name}"] = value
            else:
                name, _, values = when.partition("=")
                default = getattr(plugin.Config(), name)
                if str(default) in values.split("|"):  # e.g. local_steps when local_epochs=0
                    choices = plugin.Config.__dataclass_fields__[name].metadata.get("choices")
                    other = [c for c in choices or () if c not in values.split("|")]
                    given[f"option.{name}"] = other[0] if other else 1
            if plugin.name == "fedavg":
                given["train.steps"] = 5
            if plugin.name == "vertical":
                root = parquet_dir.removeprefix("parquet:")
                given["option.parties"] = f"a={root},b={root}"
            _refused(tmp_path, given, flag_of(f))
            walked += 1
    assert walked >= 30, walked


def test_settings_a_job_reads_are_taken(tmp_path):
    job = _resolve(tmp_path, {"model.name": "mlp", "model.hidden": 32, "train.steps": 10})
    assert job.model.hidden == 32
    job = _resolve(tmp_path, {"strategy.name": "ps", "option.mode": "ssp", "option.staleness": 1})
    assert job.strategy.options.staleness == 1
    job = _resolve(tmp_path, {"optim.name": "momentum", "optim.momentum": 0.5})
    assert job.optim.momentum == 0.5


def test_a_job_file_setting_what_the_job_ignores_is_warned_about_not_refused(tmp_path, capsys):
    path = tmp_path / "job.toml"
    path.write_text(
        textwrap.dedent("""
        [model]
        name = "linear"
        hidden = 64
        [strategy.fedavg]
        clients = 4
        """)
    )
    job = _resolve(tmp_path, config=str(path))
    err = capsys.readouterr().err
    assert "shoal: warning: --hidden: --model linear does not read it" in err, err
    assert f"in {path}; ignored" in err
    assert "[strategy.fedavg]" in err and "this job runs allreduce" in err
    assert job.model.name == "linear"
    # a value at its default (a copied config.toml sets every key) is no warning
    path.write_text("[model]\nname = 'linear'\nhidden = 128\n")
    _resolve(tmp_path, config=str(path))
    assert "warning" not in capsys.readouterr().err


def test_dp_clip_without_noise_is_refused_unless_asked_for(tmp_path):
    _refused(tmp_path, {"train.dp_clip": 1.0}, "--dp-clip 1 without noise")
    job = _resolve(tmp_path, {"train.dp_clip": 1.0, "train.dp_noise": 0.0})
    assert job.train.dp_clip == 1.0


def test_a_strategys_default_optimizer_comes_with_its_learning_rate(tmp_path):
    job = _resolve(tmp_path, {"strategy.name": "diloco"})
    assert (job.optim.name, job.optim.lr) == ("adamw", 0.003)
    job = _resolve(tmp_path, {"strategy.name": "diloco", "optim.lr": 0.01})
    assert (job.optim.name, job.optim.lr) == ("adamw", 0.01)
    job = _resolve(tmp_path, {"strategy.name": "diloco", "optim.name": "sgd"})
    assert (job.optim.name, job.optim.lr) == ("sgd", 0.05)


SHARED = {
    "privacy": ({"train.dp_clip": 1.0, "train.dp_noise": 1.0}, "differential privacy"),
    "balance static": ({"train.balance": "static:1,1"}, "--balance"),
    "balance auto": ({"train.balance": "auto"}, "--balance"),
    "micro-batches": ({"train.max_rank_batch": 8}, "--max-rank-batch"),
    "compression": ({"option.compress": "topk:0.1"}, "--compress"),
    "servers": ({"cluster.servers": 2}, "--servers"),
    "startup timeout": ({"cluster.startup_timeout": 5.0}, "--startup-timeout"),
    "grace period": ({"cluster.grace_period": 5.0}, "--grace-period"),
}


def _supports(plugin, what: str) -> bool:
    return {
        "privacy": bool(plugin.privacy),
        "balance static": "static" in plugin.balance_modes,
        "balance auto": "auto" in plugin.balance_modes,
        "micro-batches": plugin.micro_batching,
        "compression": any(f.name == "compress" for f in dataclasses.fields(plugin.Config)),
        "servers": "cluster.servers" in plugin.reads,
        "startup timeout": "cluster.startup_timeout" in plugin.reads,
        "grace period": "cluster.grace_period" in plugin.reads,
    }[what]


def test_every_builtin_strategy_refuses_each_shared_option_it_does_not_implement(tmp_path):
    refused = 0
    for plugin in BUILTIN.values():
        for what, (given, flag) in SHARED.items():
            if _supports(plugin, what):
                continue
            base = {"strategy.name": plugin.name, "model.name": "mlp", "train.steps": 8}
            if plugin.name == "pipeline":
                base["model.layers"] = 2
            if plugin.name == "vertical":  # (it reads no model: its parties build theirs)
                del base["model.name"]
                base["option.parties"] = f"a={tmp_path},b={tmp_path}"
            _refused(tmp_path, {**base, **given}, flag)
            refused += 1
    assert refused >= 20, refused


PLANTED = '''
from shoal.strategies import Plugin
from shoal.strategies.allreduce import AllReduce


class Careless(Plugin):
    """A strategy whose check skips the shared checks (it does not call the base)."""

    name = "careless"
    runtime = AllReduce

    def check(self, job):
        pass
'''


def test_a_plugin_that_skips_the_shared_checks_still_gets_them(tmp_path, monkeypatch):
    (tmp_path / "careless.py").write_text(PLANTED)
    monkeypatch.syspath_prepend(str(tmp_path))
    base = {"strategy.name": "careless:Careless"}
    line = _refused(tmp_path, {**base, "train.dp_clip": 1.0, "train.dp_noise": 1.0}, "--dp")
    assert "does not run differential privacy" in line and "allreduce" in line
    _refused(tmp_path, {**base, "train.balance": "auto"}, "--balance")
    _refused(tmp_path, {**base, "train.max_rank_batch": 4}, "--max-rank-batch")
    assert _resolve(tmp_path, base).strategy.name == "careless:Careless"


def test_the_engines_take_a_job_with_no_argument_parser(tmp_path, monkeypatch):
    """shoal.ray and shoal.spark resolve a JobConfig, a dict or a job file without
    argparse or a temporary job file."""
    from shoal.run import engines

    def refuse(*args, **kwargs):
        raise AssertionError("argparse was used")

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", refuse)
    monkeypatch.setattr("tempfile.NamedTemporaryFile", refuse)
    job = JobConfig()
    job.model.name, job.train.steps, job.output.out = "linear", 20, str(tmp_path / "a")
    resolved = engines.resolve(job, "ray")
    assert resolved.cluster.engine == "ray" and resolved.train.steps == 20
    assert resolved.output.out == str(tmp_path / "a")
    tables = {"model": {"name": "mlp"}, "output": {"out": str(tmp_path / "b")}}
    resolved = engines.resolve(tables, "spark", {"cluster.workers": 3})
    assert resolved.cluster.workers == 3 and resolved.model.name == "mlp"
    path = tmp_path / "job.toml"
    path.write_text(f"[model]\nname = 'softmax'\n[output]\nout = '{tmp_path / 'c'}'\n")
    assert engines.resolve(str(path), "ray").model.name == "softmax"


def test_overrides_use_the_toml_names(tmp_path):
    from shoal.run.api import _given

    given = _given({"train": {"steps": 5}, "strategy.diloco.sync_every": 4, "cluster.nnodes": 1})
    assert given == {"train.steps": 5, "option.sync_every": 4, "cluster.nnodes": (0, 1)}
    given = _given({"strategy": {"name": "diloco", "diloco": {"outer_lr": 0.5}}})
    assert given == {"strategy.name": "diloco", "option.outer_lr": 0.5}
    with pytest.raises(UserError, match="unknown key 'stepz' in \\[train\\]"):
        _given({"train": {"stepz": 5}})
    with pytest.raises(UserError, match="unknown section 'trian'"):
        _given({"trian.steps": 5})


@pytest.mark.parametrize(
    ("given", "flag"),
    [
        ({"option.compress": "fp16"}, "--compress"),
        ({"train.dp_clip": 1.0, "train.dp_noise": 1.0}, "DP-SGD"),
        ({"train.balance": "static:1,2"}, "--balance static"),
        (
            {"strategy.name": "fedavg", "option.listen": "127.0.0.1:7000", "cluster.workers": 1},
            "--listen",
        ),
    ],
)
def test_recovery_in_place_refuses_what_it_cannot_keep_exact(tmp_path, given, flag):
    _refused(tmp_path, {"cluster.recovery": "inplace", "cluster.workers": 2, **given}, flag)


@pytest.mark.parametrize(
    ("given", "why"),
    [
        ({"strategy.name": "tensor"}, "split layers exists nowhere else"),
        ({"strategy.name": "pipeline"}, "exist on one rank only"),
        ({"strategy.name": "easgd"}, "exist on its rank only"),
        ({"strategy.name": "fsdp"}, "give it a replicated dimension"),
    ],
)
def test_a_strategy_that_cannot_recover_in_place_refuses_the_flag(tmp_path, given, why):
    """--recovery inplace where a rank holds state that exists nowhere else: refused,
    saying so (the default, auto, recovers such a job by restart)."""
    job = {"cluster.recovery": "inplace", "cluster.workers": 2, **given}
    assert why in _refused(tmp_path, job, "--recovery inplace")


def test_recovery_auto_is_in_place_where_the_job_allows_it_and_restart_elsewhere(tmp_path):
    from shoal.strategies import resolve

    def mode(**given):
        job = _resolve(tmp_path, {"cluster.workers": 4, **given})
        return resolve(job).recovery(job)

    assert mode() == ("inplace", "")
    assert mode(**{"strategy.name": "fsdp", "option.mesh": "dp=2,fsdp=2"}) == ("inplace", "")
    assert mode(**{"strategy.name": "fsdp"})[0] == "restart"
    assert mode(**{"strategy.name": "tensor"})[0] == "restart"
    assert mode(**{"option.compress": "fp16"}) == (
        "restart",
        "--recovery inplace runs without --compress for now: a codec's error "
        "feedback (and PowerSGD's warm start) would keep what a step cut short sent",
    )
    # local SGD and DiLoCo keep their codec's state with each point they go back to
    assert mode(**{"strategy.name": "local-sgd", "option.compress": "topk:0.01"}) == (
        "inplace",
        "",
    )
    streaming = {"strategy.name": "diloco", "option.fragments": 4, "option.sync_every": 8}
    assert "set --meet-every or --checkpoint-every" in mode(**streaming)[1]
    assert mode(**streaming, **{"train.checkpoint_every": 16}) == ("inplace", "")
    assert mode(**streaming, **{"option.meet_every": 16}) == ("inplace", "")
    assert mode(**{"cluster.recovery": "restart"}) == ("restart", "")
