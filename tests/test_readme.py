"""The README's training examples: each one resolves as written, runs shortened, and the
DiLoCo one trains as well as all-reduce at the README's own step count."""

from __future__ import annotations

import shlex

import pytest

from shoal.cli import main
from tests.conftest import REPO, read_summary, train


def _examples() -> list[list[str]]:
    """The ``shoal train`` lines of the README's "Training" section, as arguments."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Training") :]
    block = section[section.index("```bash") : section.index("```", section.index("```bash") + 3)]
    lines = [line.split("#")[0].strip() for line in block.splitlines()]
    return [shlex.split(line)[2:] for line in lines if line.startswith("shoal train ")]


EXAMPLES = _examples()


def _placed(args: list[str], tmp_path) -> list[str]:
    """The example with its run directory (and job file) under ``tmp_path``."""
    args = [str(tmp_path / a) if a.startswith("runs/") else a for a in args]
    if "--config" in args:
        job = tmp_path / "job.toml"
        job.write_text("[model]\nname = 'mlp'\n[train]\nsteps = 20\n")
        args[args.index("--config") + 1] = str(job)
    return args


def test_the_readme_has_its_examples():
    assert len(EXAMPLES) >= 7, EXAMPLES
    assert any("diloco" in e for e in EXAMPLES)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args", EXAMPLES, ids=[" ".join(e[:4]) for e in EXAMPLES])
def test_each_readme_example_resolves_as_written(args, tmp_path, capsys):
    args = _placed(args, tmp_path)
    if "--resume" in args:
        (tmp_path / "runs").mkdir(exist_ok=True)
        pytest.skip("continues the run of the example before it (run below)")
    assert main(["train", *args, "--dry-run"]) == 0, capsys.readouterr().err
    assert "warning" not in capsys.readouterr().err


def _without(args: list[str], flag: str) -> list[str]:
    """``args`` less ``flag`` and its value."""
    if flag not in args:
        return args
    k = args.index(flag)
    return args[:k] + args[k + 2 :]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_readme_examples_run_shortened(tmp_path):
    """Every example cut to 6 steps (and to 2 workers, where no mesh needs 4); the one that
    resumes a run continues the run of the example that named it, to step 10."""
    runs = {}
    for i, args in enumerate(EXAMPLES):
        if "--resume" in args:
            continue
        out = tmp_path / f"run{i}"
        if "--out" in args:
            runs[args[args.index("--out") + 1]] = out
        short = _without(_without(_placed(args, tmp_path), "--out"), "--steps")
        if "--mesh" not in short and "--workers" in short:  # (two start faster than four)
            short = [*_without(short, "--workers"), "--workers", "2"]
        train(out, *short, "--steps", "6", "--log-every", "3")
        assert read_summary(out)["steps"] == 6
    (resumed,) = [e for e in EXAMPLES if "--resume" in e]
    out = runs[resumed[resumed.index("--resume") + 1]]
    train(out, "--resume", str(out), "--steps", "10")
    assert read_summary(out)["steps"] == 10


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_readme_diloco_example_trains_as_well_as_allreduce(tmp_path):
    """The README's DiLoCo line as written (its default inner optimizer with its default
    learning rate), against the same job under all-reduce: within 2 points of accuracy."""
    (diloco,) = [e for e in EXAMPLES if "diloco" in e]
    train(tmp_path / "diloco", *diloco)
    plain = [a for a in diloco if a not in ("--strategy", "diloco", "--sync-every", "8")]
    train(tmp_path / "allreduce", *plain)
    ours, theirs = read_summary(tmp_path / "diloco"), read_summary(tmp_path / "allreduce")
    assert ours["steps"] == theirs["steps"]
    assert ours["test_accuracy"] >= theirs["test_accuracy"] - 0.02, (ours, theirs)
