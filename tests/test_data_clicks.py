"""``shoal data make clicks``: a click log split by columns between two parties, from a
known model."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from shoal.cli import main
from shoal.data.make import click_truth, make

pytestmark = pytest.mark.timeout(60)


def read(root, party, split="train"):
    table = pq.read_table(root / party / split)
    return {name: np.asarray(table.column(name).to_pylist()) for name in table.column_names}


def test_each_party_holds_its_columns_of_a_share_of_the_samples(tmp_path):
    out = tmp_path / "clicks"
    meta = make("clicks", 40_000, out, test_rows=4_000, options={"overlap": 0.7})
    assert (out / "_SUCCESS").exists() and meta["parties"] == ["user", "item"]
    user, item = read(out, "user"), read(out, "item")
    assert set(user) == {"id", "user"} and set(item) == {"id", "item", "click"}  # no leaks
    for party in (user, item):
        assert len(np.unique(party["id"])) == len(party["id"])
        assert abs(len(party["id"]) / 40_000 - 0.7) < 0.01
    common = np.intersect1d(user["id"], item["id"])
    assert abs(len(common) / 40_000 - 0.49) < 0.01  # drawn independently per party
    test_ids = np.concatenate([read(out, "user", "test")["id"], read(out, "item", "test")["id"]])
    assert not np.isin(test_ids, np.concatenate([user["id"], item["id"]])).any()

    # the clicks follow the stored true model on the joined rows
    ou, oi = np.argsort(user["id"]), np.argsort(item["id"])
    uu = user["user"][ou[np.searchsorted(user["id"], common, sorter=ou)]]
    ii = item["item"][oi[np.searchsorted(item["id"], common, sorter=oi)]]
    clicks = item["click"][oi[np.searchsorted(item["id"], common, sorter=oi)]]
    m, b = np.asarray(meta["true_M"]), meta["true_b"]
    p = 1 / (1 + np.exp(-(np.einsum("nd,de,ne->n", uu, m, ii) + b)))
    for lo, hi in ((0, 0.2), (0.2, 0.5), (0.5, 0.8), (0.8, 1.0)):
        sel = (p >= lo) & (p < hi)
        assert abs(clicks[sel].mean() - p[sel].mean()) < 0.03  # calibrated
    assert np.allclose(m, click_truth(1234)["M"])
    again = tmp_path / "again"
    make("clicks", 40_000, again, test_rows=4_000, options={"overlap": 0.7})
    assert np.array_equal(read(again, "item")["id"], item["id"])  # seed and rows alone


def test_an_option_of_another_generator_is_refused(tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["data", "make", "ctr", "--rows", "10", "--out", str(out), "--overlap", "0.5"]) == 2
    assert "--overlap is an option of clicks, not of ctr" in capsys.readouterr().err
    assert (
        main(["data", "make", "clicks", "--rows", "10", "--out", str(out), "--context", "8"]) == 2
    )
    assert not out.exists()
    assert (
        main(["data", "make", "clicks", "--rows", "10", "--out", str(out), "--overlap", "0"]) == 2
    )
    assert "--overlap must be in (0, 1]" in capsys.readouterr().err
    assert not out.exists()
