"""Every user mistake: one clear line on stderr, non-zero exit, nothing written."""

from __future__ import annotations

import socket

import pytest

from shoal.cli import main


def assert_one_line_error(proc, needle: str) -> None:
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr
    assert len(err.splitlines()) == 1, err
    assert needle in err, err


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--workers", "0"], "--workers must be a positive integer"),
        (["--model", "resnet9000"], "unknown model 'resnet9000'"),
        (["--data", "imagenet"], "unknown dataset 'imagenet'"),
        (["--strategy", "magic"], "unknown strategy 'magic'"),
        (["--model", "nopkg.nomodule:build"], "cannot import model module 'nopkg.nomodule'"),
        (["--workers", "4", "--batch-size", "2"], "must be at least the number of workers (4)"),
        (["--batch-size", "100000"], "larger than the training set"),
        (["--optimizer", "lbfgs"], "invalid choice: 'lbfgs'"),
        (["--steps", "many"], "invalid int value: 'many'"),
        (["--lr", "0"], "--lr must be > 0"),
        (
            ["--strategy", "allreduce", "--ps-mode", "asp"],
            "--ps-mode is an option of --strategy ps",
        ),
        (["--strategy", "fsdp", "--compress", "fp16"], "--compress is an option of --strategy"),
        (["--strategy", "tensor", "--model", "ctr"], "needs a model that declares how to split"),
        (["--strategy", "pipeline", "--model", "ctr"], "needs an nn.Sequential model"),
        (["--strategy", "easgd", "--rho", "50"], "lower --rho"),
        (["--rdzv-endpoint", "nohost"], "must look like HOST:PORT"),
        (["--bogus-flag"], "unrecognized argument --bogus-flag (see shoal train --help)"),
        (["--stepz", "5"], "unrecognized argument --stepz; did you mean --steps?"),
        (["--compress", "zip"], "unknown codec 'zip'"),
        (["--nnodes", "2:x"], "'2:x' is not N or MIN:MAX"),
        (["--nnodes", "3:2", "--rdzv-endpoint", "127.0.0.1:1"], "MIN must be between 1 and MAX"),
        (
            ["--strategy", "local-sgd", "--checkpoint-every", "10"],
            "must be a multiple of --sync-every 8",
        ),
        (["--compress", "topk:5"], "needs 0 < R <= 1"),
        (["--model", "cnn", "--data", "synthetic-linear"], "--model cnn needs square images"),
        (
            ["--strategy", "ps", "--servers", "1", "--compress", "powersgd:2"],
            "powersgd needs whole matrices",
        ),
        (["--engine", "yarn"], "invalid choice: 'yarn'"),
        (["--balance", "fancy"], "--balance fancy: use equal, auto or static:W1,W2,..."),
        (["--balance", "static:1,x"], "static weights must be positive numbers"),
        (["--workers", "3", "--balance", "static:1,2"], "gives 2 weights for 3 data-parallel"),
        (["--strategy", "ps", "--balance", "auto"], "--strategy ps runs --balance equal, not auto"),
        (["--strategy", "fsdp", "--balance", "auto"], "runs --balance equal or static, not auto"),
        (
            ["--strategy", "pipeline", "--workers", "2", "--max-rank-batch", "8"],
            "does not cut slices by --max-rank-batch",
        ),
        (
            ["--engine", "ray", "--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:1"],
            "--nnodes: under --engine ray the engine places the workers",
        ),
        (["--strategy", "fedavg", "--steps", "5", "--partition", "dirichlet:0"], "ALPHA > 0"),
        (["--strategy", "fedavg", "--steps", "5", "--partition", "pie"], "--partition pie: use"),
        (["--strategy", "fedavg"], "counts rounds in --steps"),
        (
            [
                "--strategy",
                "fedavg",
                "--steps",
                "5",
                "--model",
                "linear",
                "--partition",
                "shards:1",
            ],
            "deals rows by label: it needs a classification dataset",
        ),
        (
            ["--strategy", "fedavg", "--steps", "5", "--clients", "4", "--clients-per-round", "9"],
            "--clients-per-round 9 is more than --clients 4",
        ),
        (
            ["--strategy", "fedavg", "--steps", "5", "--workers", "2", "--listen", "127.0.0.1:1"],
            "--listen runs the federation's server as one process",
        ),
        (["--dp-noise", "1.0"], "--dp-epsilon and --dp-insecure-seed need --dp-clip"),
        (["--dp-insecure-seed"], "need --dp-clip"),
        (["--dp-clip", "1", "--dp-noise", "1", "--dp-epsilon", "3"], "not both"),
        *[
            (
                ["--strategy", name, "--workers", "2", "--dp-clip", "1", "--dp-noise", "1", *extra],
                f"--strategy {name} does not run differential privacy",
            )
            for name, extra in [
                ("ps", ["--servers", "1"]),
                ("local-sgd", []),
                ("diloco", []),
                ("easgd", []),
                ("fsdp", []),
                ("tensor", []),
                ("pipeline", ["--model", "mlp"]),
            ]
        ],
        (
            ["--dp-clip", "1", "--workers", "2", "--balance", "static:1,2"],
            "DP-SGD (--dp-clip) runs without --balance",
        ),
    ],
)
@pytest.mark.timeout(60)
def test_bad_flags(tmp_path, monkeypatch, capsys, args, needle):
    """In this process (the same ``main`` the command runs): no interpreter start per case."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    try:
        code = main(["train", "--out", str(out), *args])
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code != 0 and "Traceback" not in err
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists() and not (tmp_path / "runs").exists()


def _refused(capsys, *args: str) -> str:
    """``shoal ARGS`` in this process: refused, in one line without a traceback; the line."""
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code != 0 and "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.timeout(60)
def test_missing_invalid_and_wrong_config(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert "does not exist" in _refused(capsys, "train", "--config", str(tmp_path / "no.toml"),
                                        "--out", out)  # fmt: skip
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps=")
    assert "not valid TOML" in _refused(capsys, "train", "--config", str(bad), "--out", out)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("[train]\nstep = 5\n")
    assert "unknown key 'step'" in _refused(capsys, "train", "--config", str(wrong), "--out", out)
    unreadable = tmp_path / "dir.toml"
    unreadable.mkdir()
    assert "cannot read config file" in _refused(
        capsys, "train", "--config", str(unreadable), "--out", out
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.timeout(60)
def test_resume_without_checkpoint(tmp_path, capsys):
    err = _refused(capsys, "train", "--resume", str(tmp_path / "nothing"))
    assert "not a shoal run directory" in err
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("[train]\nsteps = 5\n")
    assert "stopped before its first checkpoint" in _refused(capsys, "train", "--resume", str(run))
    assert sorted(p.name for p in run.iterdir()) == ["config.toml"]


@pytest.mark.timeout(60)
def test_busy_port(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = tmp_path / "run"
        err = _refused(capsys, "train", "--out", str(out), "--rdzv-endpoint", f"127.0.0.1:{port}")
    assert f"port {port} on 127.0.0.1 is already in use" in err
    assert not out.exists()


@pytest.mark.timeout(60)
def test_existing_run_directory_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "already exists" in _refused(capsys, "train", "--out", str(out))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.timeout(60)
def test_bad_fault_spec_and_report_of_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SHOAL_FAULT", "explode:rank=0")
    assert "unknown fault 'explode'" in _refused(capsys, "train", "--out", str(tmp_path / "r"))
    monkeypatch.delenv("SHOAL_FAULT")
    assert "not a shoal run directory" in _refused(capsys, "report", str(tmp_path))


@pytest.mark.timeout(60)
def test_help_teaches(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for text in ("--batch-size", "GLOBAL", "--nnodes", "--rdzv-endpoint", "allreduce", "examples:"):
        assert text in out
    assert "fedavg" in out and "--dp-clip" in out


HOSTILE = ["nan", "inf", "-1", "0", "1e30", "", "FILE", "FILE/under"]
"""What the flag walk gives every flag: non-numbers, out-of-range numbers, nothing, and
paths to a file and under a file (``FILE`` stands for a real file's path)."""


def _train_flags() -> list[tuple[str, object]]:
    from shoal.cli import build_parser

    sub = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices)
    flags = []
    for action in sub.choices["train"]._actions:
        names = [o for o in action.option_strings if o.startswith("--")]
        if not names or action.nargs == 0 or names[0] in ("--help", "--dry-run"):
            continue  # switches take no value
        flags.append((max(names, key=len), action.type))
    return flags


@pytest.mark.timeout(240)
def test_every_flag_refuses_hostile_values_in_one_line(tmp_path, monkeypatch, capsys):
    """Every value-taking flag of ``shoal train --help`` x every hostile value, checked by
    ``--dry-run``: a refusal is one line with a non-zero exit and no traceback; a number
    that is not finite, negative or absurd is always refused; nothing is left behind."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SHOAL_FAULT", raising=False)
    file = tmp_path / "a-file"
    file.write_text("not a directory\n")
    out = tmp_path / "run"
    flags = _train_flags()
    assert len(flags) > 40, [f for f, _ in flags]
    refused = 0
    for flag, kind in flags:
        for raw in HOSTILE:
            value = raw.replace("FILE", str(file))
            args = ["train", flag, value, "--dry-run"]
            if flag != "--out":
                args += ["--out", str(out)]
            try:
                code = main(args)
            except SystemExit as e:  # argparse's own refusals
                code = e.code
            captured = capsys.readouterr()
            err = captured.err.strip()
            where = f"{flag} {value!r}: {err}"
            assert "Traceback" not in captured.err, where
            if code:
                refused += 1
                assert len(err.splitlines()) == 1, where
            if kind in (int, float) and raw in ("nan", "inf", "-1", "1e30"):
                assert code, f"{flag} {value!r} was accepted"
            if flag == "--out" and "FILE" in raw:
                assert code and "--out" in err, where
            assert not out.exists() and not (tmp_path / "runs").exists(), where
    assert refused > len(flags) * 3
