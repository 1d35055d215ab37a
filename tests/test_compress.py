"""Codecs in one process: bytes on the wire against the formulas, and what decoding gives."""

from __future__ import annotations

import pytest
import torch

from shoal.compress import PowerSGD, parse_codec

N, M = 256, 100  # a 256 x 100 gradient: 102,400 bytes in float32
RAW = N * M * 4


@pytest.fixture
def grad():
    return torch.randn(N, M, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "spec, nbytes",
    [
        ("none", RAW),
        ("fp16", RAW // 2),
        ("bf16", RAW // 2),
        ("topk:0.01", 256 * 8),  # ceil(1% of 25,600) = 256 entries: int32 index + float32 value
        ("qsgd:8", N * M + 4),  # one int8 per entry and the norm
        ("sign", N * M // 8 + 4 * 50),  # one bit per entry and a scale per 512 entries
        ("powersgd:4", 4 * (N + M) * 4),  # P (n x r) and Q (m x r) in float32
    ],
)
def test_payload_bytes_match_the_formula(spec, nbytes, grad):
    codec = parse_codec(spec)
    payload = codec.encode("w", grad)
    assert payload.nbytes == nbytes
    assert codec.decode(payload).shape == grad.shape


def test_ratios_are_the_advertised_ones(grad):
    ratio = {s: parse_codec(s).encode("w", grad).nbytes / RAW for s in ("topk:0.01", "sign")}
    assert ratio["topk:0.01"] == pytest.approx(1 / 50, rel=0.01)
    assert ratio["sign"] == pytest.approx(1 / 32 + 1 / 512, rel=0.01)  # bits + scales
    assert parse_codec("powersgd:4").encode("w", grad).nbytes / RAW == 4 * (N + M) / (N * M)


def test_half_precision_and_none_round_trip(grad):
    assert torch.equal(parse_codec("none").decode(parse_codec("none").encode("w", grad)), grad)
    for spec, tol in (("fp16", 1e-3), ("bf16", 1e-2)):
        codec = parse_codec(spec)
        torch.testing.assert_close(codec.decode(codec.encode("w", grad)), grad, rtol=tol, atol=tol)


def test_qsgd_is_unbiased(grad):
    codec = parse_codec("qsgd:4", seed=1)
    mean = sum(codec.decode(codec.encode("w", grad)) for _ in range(400)) / 400
    err = (mean - grad).norm() / grad.norm()
    one = (codec.decode(codec.encode("w", grad)) - grad).norm() / grad.norm()
    assert err < one / 10  # averaging many draws converges on the input: no bias


@pytest.mark.parametrize("spec", ["topk:0.01", "sign", "powersgd:2"])
def test_error_feedback_loses_nothing_for_good(spec):
    """What was sent + the residual == what went in; and the residual stays bounded."""
    codec = parse_codec(spec)
    gen = torch.Generator().manual_seed(3)
    grad = torch.randn(64, 50, generator=gen)
    sent, inputs = torch.zeros_like(grad), torch.zeros_like(grad)
    for _ in range(300):
        g = grad + 0.1 * torch.randn(64, 50, generator=gen)
        inputs += g
        sent += codec.decode(codec.encode("w", g))
    torch.testing.assert_close(sent + codec.residuals["w"], inputs, rtol=1e-4, atol=1e-2)
    assert codec.residuals["w"].norm() < inputs.norm() / 4  # sent catches up with the inputs


def test_topk_keeps_the_largest_entries():
    x = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.3])
    codec = parse_codec("topk:0.4")
    assert codec.decode(codec.encode("w", x)).tolist() == [0, -5.0, 0, 3.0, 0]


def test_sign_keeps_signs_and_mean_magnitude():
    x = torch.tensor([1.0, -3.0, 2.0, -2.0, 0.5, 0.5, -1.0, 4.0, -2.0])  # 9 entries: 2 bytes
    codec = parse_codec("sign")
    payload = codec.encode("w", x)
    out = codec.decode(payload)
    assert payload.tensors[0].numel() == 2
    assert torch.equal(out.sign(), x.sign()) and out.abs().unique().tolist() == [x.abs().mean()]


def test_powersgd_is_exact_on_low_rank_and_warm_starts():
    gen = torch.Generator().manual_seed(0)
    low = torch.randn(60, 2, generator=gen) @ torch.randn(2, 40, generator=gen)
    codec = PowerSGD(rank=2)
    torch.testing.assert_close(codec.decode(codec.encode("w", low)), low, rtol=1e-4, atol=1e-4)
    assert codec.q["w"].shape == (40, 2)
    vector = torch.randn(7, generator=gen)
    assert torch.equal(codec.decode(codec.encode("b", vector)), vector)  # vectors: uncompressed


def test_powersgd_phases_average_over_ranks():
    """The all-reduce path on two simulated ranks: sums of P and Q, then P Q^T / W."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(30, 3, generator=gen) @ torch.randn(3, 20, generator=gen)
    grads = [base + 0.01 * torch.randn(30, 20, generator=gen) for _ in range(2)]
    codecs = [PowerSGD(rank=3), PowerSGD(rank=3)]
    p_sum = sum(c.project("w", g) for c, g in zip(codecs, grads))
    q_sum = sum(c.back_project("w", p_sum) for c in codecs)
    outs = [c.finish("w", q_sum, 2) for c in codecs]
    mean = (grads[0] + grads[1]) / 2
    torch.testing.assert_close(outs[0], outs[1])
    assert (outs[0] - mean).norm() < 0.05 * mean.norm()


@pytest.mark.parametrize(
    "spec", ["zip", "topk", "topk:2", "topk:x", "qsgd:0", "qsgd:300", "powersgd:0", "fp16:3"]
)
def test_bad_specs_are_refused(spec):
    with pytest.raises(ValueError):
        parse_codec(spec)


@pytest.mark.parametrize("shape", ["normal", "strided-large", "strided-small", "sparse", "ties"])
def test_top_indices_finds_the_set_torch_topk_finds(shape):
    """The sampled threshold only narrows where torch.topk looks: whatever the layout of
    the large entries (in the sample's positions only, or never there), the k found are
    the k largest."""
    from shoal.compress.codecs import SAMPLE_STRIDE, top_indices

    n, k = 1 << 18, 2621  # (1%: the sampled path)
    gen = torch.Generator().manual_seed(0)
    mag = torch.rand(n, generator=gen)
    if shape == "strided-large":  # the sample sees only the largest entries
        mag[::SAMPLE_STRIDE] += 10
    elif shape == "strided-small":  # the sample sees none of them
        mag[::SAMPLE_STRIDE] = 0
        mag[1 :: SAMPLE_STRIDE * 4] += 10
    elif shape == "sparse":  # most entries zero, as a gradient of embeddings
        mag[torch.rand(n, generator=gen) < 0.995] = 0
    elif shape == "ties":  # the k-th largest value shared by many: any of them will do
        mag = torch.randint(0, 4, (n,), generator=gen).float()
    got = top_indices(mag, k)
    assert len(got) == k and len(set(got.tolist())) == k
    exact = torch.topk(mag, k, sorted=False).values
    assert torch.equal(mag[got].sort().values, exact.sort().values)
