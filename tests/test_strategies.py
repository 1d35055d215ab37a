"""Strategies as plugins: a user's own (the EASGD example), the built-in easgd, the
plugin contract (checks, flags, sections) and the import-layer contract."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

from shoal.config import JobConfig
from shoal.data import GlobalBatchSampler, build_dataset
from shoal.models import build_model
from shoal.models.tasks import per_sample_loss
from tests.conftest import REPO, max_abs_diff, params, read_summary, run_shoal, train

W, STEPS, TAU, RHO, LR, BATCH, SEED = 3, 40, 4, 2.0, 0.05, 48, 2
JOB = ["--model", "linear", "--steps", str(STEPS), "--batch-size", str(BATCH), "--lr", str(LR)]
JOB += ["--seed", str(SEED), "--workers", str(W)]


def easgd_reference(steps: int = STEPS) -> dict[str, torch.Tensor]:
    """Synchronous EASGD (Zhang et al. 2015, eq. 5-6) in one process: W replicas on their
    slices of each global step, plain SGD, and every TAU steps (and at the last)
    x_i -= a (x_i - c), c += a sum_i (x_i - c), with a = lr * rho."""
    job = JobConfig()
    job.model.name, job.data.name, job.train.seed = "linear", "synthetic-linear", SEED
    torch.manual_seed(SEED)  # as the trainer does, before the data and the model
    data = build_dataset(job.data)
    model = build_model(job.model, data)
    x, y = data.train
    replicas = [copy.deepcopy(model) for _ in range(W)]
    opts = [torch.optim.SGD(r.parameters(), lr=LR) for r in replicas]
    center = [p.detach().clone() for p in model.parameters()]
    samplers = [GlobalBatchSampler(data.num_train, BATCH, r, W, seed=SEED) for r in range(W)]
    alpha = LR * RHO
    for step in range(1, steps + 1):
        for replica, opt, sampler in zip(replicas, opts, samplers):
            idx, global_batch = sampler.next_batch()
            index = torch.from_numpy(idx)
            opt.zero_grad()
            loss = per_sample_loss(data.task, replica(x[index]), y[index]).sum()
            (loss * W / global_batch).backward()
            opt.step()
        if step % TAU == 0 or step == steps:
            with torch.no_grad():
                for i, c in enumerate(center):
                    diffs = [list(r.parameters())[i] - c for r in replicas]
                    for r, d in zip(replicas, diffs):
                        list(r.parameters())[i].sub_(alpha * d)
                    c.add_(alpha * sum(diffs))
    names = [n for n, _ in model.named_parameters()]
    return dict(zip(names, center))


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("easgd") / "example"
    train(out, *JOB, "--strategy", "examples.easgd:Plugin", "--tau", str(TAU), "--rho", str(RHO))
    return out


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_a_strategy_from_outside_the_package_matches_a_reference_easgd_loop(example_run):
    """The docs/STRATEGIES.md example, registered by path, trained by `shoal train`."""
    ref = easgd_reference()
    got = params(example_run)
    assert max_abs_diff(got, ref) < 1e-5
    start = easgd_reference(0)  # (it moved: the comparison is not of two initial models)
    assert max_abs_diff(got, start) > 1e-2
    assert (REPO / "examples" / "easgd.py").read_text().count("\n") < 150
    config = (example_run / "config.toml").read_text()
    assert "[strategy.easgd-example]" in config and "tau = 4" in config


@pytest.mark.timeout(180)
@pytest.mark.slow
def test_builtin_easgd_is_the_example_and_resumes_exactly(tmp_path, example_run):
    """--strategy easgd: the same algorithm; its checkpoints hold every replica, so a run
    stopped at step 20 and resumed ends where the example's unbroken run ends."""
    flags = ["--strategy", "easgd", "--sync-every", str(TAU), "--rho", str(RHO)]
    half = tmp_path / "half"
    train(half, *JOB, "--steps", "20", *flags)
    train(half, "--resume", str(half), "--steps", str(STEPS))
    assert max_abs_diff(params(half), params(example_run)) < 1e-6
    summary = read_summary(half)
    assert summary["resumed_from_step"] == 20 and len(summary["easgd"]["replica_gap_at_end"]) == W


@pytest.mark.timeout(60)
@pytest.mark.slow
def test_a_user_strategy_brings_its_flags_and_checks():
    helped = run_shoal("train", "--strategy", "examples.easgd:Plugin", "--help")
    assert helped.returncode == 0 and "--strategy easgd-example" in helped.stdout
    assert "--tau" in helped.stdout
    bad = run_shoal("train", "--strategy", "examples.easgd:Plugin", "--rho", "100", "--dry-run")
    assert bad.returncode == 2 and "lower --rho" in bad.stderr
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    wrong = run_shoal("train", "--strategy", "examples.easgd:ElasticAveraging", "--dry-run")
    assert wrong.returncode == 2 and "is no shoal.strategies.Plugin" in wrong.stderr
    other = run_shoal("train", "--strategy", "allreduce", "--tau", "3", "--dry-run")
    assert other.returncode == 2  # --tau exists only with the plugin that declares it


def _strategy_names_in(source: str, allowed: set[str]) -> list[str]:
    """Where ``source`` branches on a strategy's name (other than those ``allowed``):
    ``x.strategy.name == "ps"``, ``... in ("ps", "fedavg")``, ``.startswith("fed")``,
    ``match job.strategy.name: case "ps"``. Returns one line per finding."""
    import ast

    from shoal.strategies import BUILTIN

    names = set(BUILTIN) - allowed

    def mentions_strategy(node: ast.AST) -> bool:
        return "strateg" in ast.unparse(node) or "plugin" in ast.unparse(node)

    def literals(node: ast.AST) -> set[str]:
        found = set()
        for sub in ast.walk(node):
            if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                found.add(sub.value)
        return found

    findings = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(mentions_strategy(s) for s in sides):
                hit = set().union(*(literals(s) for s in sides)) & names
                if hit:
                    findings.append(f"line {node.lineno}: compares with {sorted(hit)}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in ("startswith", "endswith") and mentions_strategy(node.func):
                args = set().union(*(literals(a) for a in node.args))
                if any(n.startswith(a) or n.endswith(a) for a in args for n in names if a):
                    findings.append(f"line {node.lineno}: {node.func.attr}{sorted(args)}")
        elif isinstance(node, ast.Match) and mentions_strategy(node.subject):
            hit = set().union(*(literals(c.pattern) for c in node.cases)) & names
            if hit:
                findings.append(f"line {node.lineno}: match case {sorted(hit)}")
    return findings


def _own_names(rel: str) -> set[str]:
    """The strategies a module of shoal may name: those whose plugin lives in it (or in
    its package, for ps/ and federated/)."""
    import sys as _sys

    from shoal.strategies import BUILTIN

    own = set()
    for name, plugin in BUILTIN.items():
        module = Path(_sys.modules[type(plugin).__module__].__file__)
        home = module.parent if module.parent.name in ("ps", "federated") else module
        here = REPO / "shoal" / rel
        if here == home or home in here.parents:
            own.add(name)
    return own


@pytest.mark.timeout(30)
def test_no_strategy_is_named_outside_its_plugin():
    """Nothing branches on a strategy's name outside that strategy's own module (an AST
    walk: comparisons, membership, startswith, match), and no strategy checks a model's
    name (models declare their plans). The benchmarks (cli/bench*.py) are exempt: they
    name the strategies they compare, and their baselines, by design."""
    shoal = REPO / "shoal"
    for path in shoal.rglob("*.py"):
        text = path.read_text()
        rel = path.relative_to(shoal).as_posix()
        if rel.startswith("cli/bench"):
            continue
        assert not _strategy_names_in(text, _own_names(rel)), (
            rel,
            _strategy_names_in(text, _own_names(rel)),
        )
        if rel.startswith("strategies/"):
            assert not re.search(r"\bmodel\.name\b", text), rel
    config = (shoal / "config.py").read_text()
    validate = config[config.index("def validate") : config.index("def public_fields")]
    for word in ("strategy", "ps", "mesh", "sync_every", "compress"):
        assert f".{word}" not in validate, word


@pytest.mark.parametrize(
    "planted",
    [
        'if job.strategy.name == "ps":\n    pass\n',
        'if job.strategy.name in ("ps", "fedavg"):\n    pass\n',
        'ok = plugin.name not in {"allreduce"}\n',
        'if job.strategy.name.startswith("fed"):\n    pass\n',
        'match job.strategy.name:\n    case "pipeline":\n        pass\n',
        'if ok or job.strategy.name == "easgd":\n    pass\n',
    ],
)
def test_the_strategy_name_check_catches_a_planted_branch(planted):
    assert _strategy_names_in(planted, set()), planted


def _lint_imports(config, root, cwd) -> tuple[int, str]:
    import os
    import shutil
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(root)}
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    cmd = [exe, "--no-cache", "--config", str(config)]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.timeout(180)
def test_the_layer_contract_holds_and_catches_an_upward_import(tmp_path):
    """pyproject.toml declares docs/ARCHITECTURE.md's layers as an import-linter contract;
    it holds for shoal, and fails, naming the import, for a copy with one upward import
    (the copy is renamed, so that the installed shoal cannot stand in for it)."""
    pyproject = REPO / "pyproject.toml"
    code, out = _lint_imports(pyproject, REPO, tmp_path)
    assert code == 0 and "1 kept, 0 broken" in out, out
    for path in (REPO / "shoal").rglob("*.py"):
        target = tmp_path / "shoalcopy" / path.relative_to(REPO / "shoal")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(re.sub(r"\bshoal\b", "shoalcopy", path.read_text()))
    config = tmp_path / "shoalcopy" / "config.py"
    config.write_text(config.read_text() + "\n\ndef _up():\n    import shoalcopy.trainer\n")
    contract = tmp_path / "contract.toml"
    contract.write_text(re.sub(r"\bshoal\b", "shoalcopy", pyproject.read_text()))
    code, out = _lint_imports(contract, tmp_path, tmp_path)
    assert code != 0 and "1 broken" in out, out
    assert "shoalcopy.config -> shoalcopy.trainer" in out, out


class _Declared(torch.nn.Sequential):
    """A user's model that says where a pipeline cuts it."""

    def pipeline_split_points(self, stages: int) -> list[str]:
        return ["second"] if stages == 2 else ["nope"]


@pytest.mark.timeout(30)
def test_models_declare_how_strategies_split_them():
    """A pipeline asks the model for its split points; tensor parallelism for its plan:
    checked on the model before anything starts, with no strategy naming a model."""
    from collections import OrderedDict

    from shoal.errors import UserError
    from shoal.strategies import resolve

    units = OrderedDict(first=torch.nn.Linear(4, 4), second=torch.nn.Linear(4, 4))
    model = _Declared(units)
    job = JobConfig()
    job.strategy.name, job.cluster.workers = "pipeline", 2
    pipeline = resolve(job)
    pipeline.check_model(job, model)  # two stages: cut where the model says
    from shoal.strategies.pipeline import split_points, stage_count

    assert split_points(job.strategy.options, model, 2) == ["second"]
    job.strategy.options.schedule = "interleaved"  # four stages: the model names no unit
    with pytest.raises(UserError, match="too few for 4 stages"):
        pipeline.check_model(job, model)
    job.strategy.options.schedule, job.strategy.options.split_at = "1f1b", "first"
    assert stage_count(job.strategy.options, 2) == 2
    assert split_points(job.strategy.options, model, 2) == ["first"]  # --split-at wins
    tensor_job = JobConfig()
    tensor_job.strategy.name, tensor_job.cluster.workers = "tensor", 2
    tensor = resolve(tensor_job)
    with pytest.raises(UserError, match="declares how to split it"):
        tensor.check_model(tensor_job, model)
    tensor_job.model.hidden, tensor_job.data.name = 6, "digits"
    mlp = build_model(tensor_job.model, build_dataset(tensor_job.data))
    tensor.check_model(tensor_job, mlp)  # the built-in mlp declares its plan
    tensor_job.cluster.workers = 4
    with pytest.raises(UserError, match="--hidden 6 must be a multiple of tp=4"):
        tensor.check_model(tensor_job, mlp)
