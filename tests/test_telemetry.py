"""Named telemetry records: what a worker reports, to and from the wire."""

from __future__ import annotations

import pytest
import torch

from shoal.telemetry import Totals, Window, window_record


def test_a_window_survives_its_tensor_form_by_name():
    w = Window(loss_sum=3.5, samples=7, bytes_sent=10, bytes_received=20)
    w.phases["comm"], w.memory["params"] = 0.25, 4096
    back = Window.from_tensor(w.to_tensor())
    assert back == w
    assert len(Window.columns()) == w.to_tensor().numel()
    with pytest.raises(ValueError, match="a window row has"):
        Window.from_tensor(torch.ones(9, dtype=torch.float64))  # (an older, positional row)


def test_a_record_averages_phases_over_the_shares_of_a_step():
    a, b = Window(loss_sum=2, samples=2), Window(loss_sum=6, samples=2)
    a.phases["forward_backward"], b.phases["forward_backward"] = 4.0, 8.0
    r = window_record([a, b], step=4, epoch=0.5, lr=0.1, steps=2, global_samples=4,
                      elapsed=2.0, wall_time=3.0)  # fmt: skip
    assert r["loss"] == 2.0 and r["samples_per_s"] == 2.0 and r["step_time_s"] == 1.0
    assert r["t_forward_backward"] == pytest.approx((4 + 8) / 2 / 2)
    ps = window_record([a, b], step=4, epoch=0.5, lr=0.1, steps=2, global_samples=4,
                       elapsed=2.0, wall_time=3.0, shares=4)  # fmt: skip
    assert ps["t_forward_backward"] == pytest.approx((4 + 8) / 4 / 2)


@pytest.mark.parametrize(
    "bad",
    [
        "not a dict",
        {"rank": 0},
        {"rank": "x", "host": "h", "bytes_sent": 0, "bytes_received": 0, "memory": {}, "time": {}},
        {"rank": 0, "host": "h", "bytes_sent": 0, "bytes_received": 0, "memory": [], "time": {}},
        {
            "rank": 0,
            "host": "h",
            "bytes_sent": 0,
            "bytes_received": 0,
            "memory": {str(i): i for i in range(100)},
            "time": {},
        },
    ],
)
def test_totals_from_the_wire_are_checked(bad):
    with pytest.raises(ValueError, match="totals"):
        Totals.from_dict(bad)


def test_totals_keep_the_host_a_name():
    t = Totals(0, "node-a.example", 1, 2, {"params": 3}, {"comm": 0.5}, {"idle": 0.1})
    back = Totals.from_dict(t.to_dict())
    assert back == t and back.summary_entry()["host"] == "node-a.example"
