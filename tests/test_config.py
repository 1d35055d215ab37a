"""Config: TOML in and out, layering, validation messages."""

from __future__ import annotations

import pytest

from shoal.config import JobConfig, parse_endpoint
from shoal.errors import UserError
from shoal.jobfile import dumps_toml, from_dict, load_toml
from shoal.strategies import resolve


def test_toml_round_trip(tmp_path):
    job = JobConfig()
    job.model.name = "linear"
    job.train.steps = 123
    job.optim.lr = 0.25
    job.data.drop_last = True
    path = tmp_path / "job.toml"
    path.write_text(dumps_toml(job))
    assert load_toml(path) == job


def test_layering_keeps_base_values(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text("[train]\nsteps = 7\n")
    base = JobConfig()
    base.model.name = "softmax"
    job = load_toml(path, base)
    assert (job.model.name, job.train.steps) == ("softmax", 7)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"nope": {}}, "unknown section [nope]"),
        ({"train": {"stepz": 3}}, "unknown key 'stepz' in [train]"),
        ({"train": {"steps": "ten"}}, "[train] steps must be a int"),
        ({"train": {"steps": True}}, "[train] steps must be a int"),
        ({"optim": {"lr": "fast"}}, "[optim] lr must be a float"),
        ({"train": 3}, "[train] must be a table"),
    ],
)
def test_bad_values_are_user_errors(data, message):
    with pytest.raises(UserError, match=None) as e:
        from_dict(data)
    assert message in str(e.value)


def test_int_accepted_for_float():
    assert from_dict({"optim": {"lr": 1}}).optim.lr == 1.0


def test_invalid_toml_is_user_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train\nsteps = ")
    with pytest.raises(UserError, match="not valid TOML"):
        load_toml(path)
    with pytest.raises(UserError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("train", "batch_size", 3, "must be at least the number of workers"),
        ("optim", "lr", -1.0, "--lr must be > 0"),
        ("optim", "name", "lbfgs", "--optimizer must be one of"),
        ("cluster", "node_rank", 2, "--node-rank 2 must be between"),
        ("train", "epochs", 0.0, "--epochs must be > 0"),
    ],
)
def test_validate(section, key, value, message):
    job = JobConfig()
    job.cluster.workers = 4
    setattr(getattr(job, section), key, value)
    with pytest.raises(UserError) as e:
        job.validate()
    assert message in str(e.value)


def test_multinode_needs_endpoint():
    job = JobConfig()
    job.cluster.nnodes = 2
    with pytest.raises(UserError, match="--rdzv-endpoint"):
        job.validate()
    job.cluster.rdzv_endpoint = "10.0.0.1:29500"
    job.validate()
    assert job.world_size == 4


@pytest.mark.parametrize("bad", ["localhost", ":80", "host:port", "h:70000"])
def test_parse_endpoint_rejects(bad):
    with pytest.raises(UserError):
        parse_endpoint(bad)
    assert parse_endpoint("[::1]:5") == ("[::1]", 5)


def test_a_strategy_checks_what_it_needs_of_the_job():
    """No strategy-specific check is left in JobConfig.validate: the plugins check."""
    job = JobConfig()
    job.cluster.workers = 0
    job.validate()  # (a ps machine may hold only servers)
    with pytest.raises(UserError, match="--workers must be a positive integer"):
        resolve(job).check(job)
    job.strategy.name, job.cluster.servers = "ps", 0
    with pytest.raises(UserError, match="--workers or --servers"):
        resolve(job).check(job)


def test_strategy_sections_round_trip_through_toml(tmp_path):
    job = from_dict({"strategy": {"name": "ps", "ps": {"mode": "ssp", "staleness": 5}}})
    assert resolve(job).name == "ps"
    assert (job.strategy.options.mode, job.strategy.options.staleness) == ("ssp", 5)
    text = dumps_toml(job)
    assert "[strategy.ps]" in text and "bucket_mb" not in text  # only the chosen section
    path = tmp_path / "job.toml"
    path.write_text(text)
    again = load_toml(path)
    resolve(again)
    assert again.strategy.options == job.strategy.options


def test_files_written_before_sections_still_load():
    """An old config.toml has every strategy's option as a loose key of [strategy]."""
    old = {
        "name": "diloco",
        "bucket_mb": 25.0,
        "ps_mode": "asp",
        "sync_every": 4,
        "outer_lr": 0.5,
        "compress": "fp16",
        "heartbeat_timeout": 2.0,
    }
    job = from_dict({"strategy": old})
    resolve(job)
    opts = job.strategy.options
    assert (opts.sync_every, opts.outer_lr, opts.compress) == (4, 0.5, "fp16")
    assert job.strategy.heartbeat_timeout == 2.0


@pytest.mark.parametrize(
    "table, message",
    [
        ({"name": "ps", "nope": {"x": 1}}, "unknown section [strategy.nope]"),
        ({"name": "ps", "ps": {"mode": "fast"}}, "--ps-mode must be one of"),
        ({"name": "ps", "ps": {"staleness": -1}}, "--staleness must be >= 0"),
        ({"name": "ps", "ps": {"bucket_mb": 1.0}}, "unknown key 'bucket_mb' in [strategy.ps]"),
        ({"name": "allreduce", "sync_evry": 3}, "unknown key 'sync_evry' in [strategy]"),
        ({"name": "easgd", "easgd": {"rho": "big"}}, "[strategy.easgd] rho must be a float"),
    ],
)
def test_bad_strategy_sections_are_one_line(table, message):
    with pytest.raises(UserError) as e:
        resolve(from_dict({"strategy": table}))
    assert message in str(e.value)


def test_a_flag_of_another_strategy_is_refused():
    job = JobConfig()
    job.strategy.given["mode"] = "asp"
    with pytest.raises(UserError, match="--ps-mode is an option of --strategy ps, not allreduce"):
        resolve(job)
