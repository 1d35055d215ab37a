"""``shoal.train`` from Python: the same job as ``shoal train``, the same model."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.conftest import max_abs_diff, params, shoal_env, train

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

JOB = {"model": {"name": "mlp"}, "train": {"steps": 60}, "cluster": {"workers": 2}}


def test_shoal_train_from_python_equals_the_command(tmp_path):
    """A fresh interpreter: ``import shoal; shoal.train({...})`` trains, hands back the
    summary's numbers and metrics, and its model is the command's, to the last bit."""
    out = tmp_path / "api"
    script = textwrap.dedent(f"""
        import shoal
        r = shoal.train({JOB!r}, output={{"out": {str(out)!r}, "progress": False}})
        assert r.run_dir.name == "api" and r.model_path.is_file()
        assert r.summary["steps"] == 60 and r["test_accuracy"] > 0.2
        rows = r.metrics
        columns = rows.columns if hasattr(rows, "columns") else rows[0]
        assert len(rows) >= 6 and "loss" in list(columns)
        print("ok", r["final_loss"])
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=shoal_env(), capture_output=True,
                          text=True, timeout=200)  # fmt: skip
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr
    cli = tmp_path / "cli"
    train(cli, "--model", "mlp", "--steps", "60", "--workers", "2")
    assert max_abs_diff(params(out), params(cli)) == 0.0
    assert (out / "report.html").is_file()  # (the report, as the command writes it)


def test_a_mistake_raises_the_line_the_command_prints(tmp_path):
    import shoal
    from shoal.errors import UserError

    with pytest.raises(UserError, match="--hidden: --model linear does not read it"):
        shoal.train(
            {"model": {"name": "linear"}}, model={"hidden": 8}, output={"out": str(tmp_path)}
        )
    assert not any(tmp_path.iterdir())


def test_a_failed_training_raises_with_the_workers_exception(tmp_path, monkeypatch):
    import shoal
    from shoal.errors import TrainingFailed

    (tmp_path / "boom.py").write_text(
        "from torch import nn\n"
        "class Boom(nn.Linear):\n"
        "    def forward(self, x):\n"
        "        raise ValueError('boom in forward')\n"
        "def build(data, cfg):\n"
        "    return Boom(64, 10)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{shoal_env()['PYTHONPATH']}")
    job = {"model": {"name": "boom:build"}, "train": {"steps": 5}, "cluster": {"workers": 1}}
    with pytest.raises(TrainingFailed) as e:
        shoal.train(job, output={"out": str(tmp_path / "run"), "progress": False})
    assert "not retried" in str(e.value) and "boom in forward" in str(e.value)
    assert e.value.raised is not None and e.value.raised.kind == "ValueError"
