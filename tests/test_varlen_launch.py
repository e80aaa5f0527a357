"""attention_varlen's one-launch Triton path (flashmaps.triton_varlen, Static.VARLEN) against the same sequences
run one call at a time (flashmaps.attention on each sequence's views): outputs, statistics and gradients, with the
kernel launches counted. Under the interpreter on the CPU; small shapes."""

from __future__ import annotations

import pytest
import torch

import flashmaps
import flashmaps.functional as F
import flashmaps.triton_path as TPth
from flashmaps import triton_varlen

from helpers import KERNEL_DEVICE, TRITON_NORMS

#: 0-length and 1-length sequences, lengths that are not a multiple of the tile (16), L > S and L < S, S = 0
LENS_Q, LENS_K = [5, 1, 0, 19, 7, 3], [5, 9, 3, 19, 30, 0]


def _packed(lens_q, lens_k, Hq, Hkv, D, Dv, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(sum(n), h, d, generator=g).to(KERNEL_DEVICE).requires_grad_()
               for n, h, d in ((lens_q, Hq, D), (lens_k, Hkv, D), (lens_k, Hkv, Dv)))
    cq, ck = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32, device=KERNEL_DEVICE)
              for n in (lens_q, lens_k))
    return q, k, v, cq, ck


class _Launches:
    """Records the kernels launched (triton_path._launch, used by both launchers, and the preprocess) and every
    call of flashmaps.attention (the per-sequence loop)."""

    def __init__(self, monkeypatch):
        self.kernels, self.calls = [], 0
        real_launch, real_attention, real_pre = TPth._launch, F.attention, triton_varlen.attn_bwd_preprocess

        def launch(kernel, *a, **kw):
            self.kernels.append(kernel.__name__)
            return real_launch(kernel, *a, **kw)

        def attention(*a, **kw):
            self.calls += 1
            return real_attention(*a, **kw)

        class Pre:
            def __getitem__(_, grid):
                self.kernels.append("attn_bwd_preprocess")
                return real_pre[grid]

        monkeypatch.setattr(triton_varlen, "_launch", launch)
        monkeypatch.setattr(TPth, "_launch", launch)
        monkeypatch.setattr(triton_varlen, "attn_bwd_preprocess", Pre())
        monkeypatch.setattr(F, "attention", attention)

    def take(self):
        out, self.kernels, self.calls = (self.kernels, self.calls), [], 0
        return out


def _run(q, k, v, cq, ck, norm, **kw):
    out, st = flashmaps.attention_varlen(q, k, v, cq, ck, max(cq.diff().tolist()), max(ck.diff().tolist()), norm,
                                         backend="triton", return_stats=True, **kw)
    return out, st


def _loss_grads(out, st, q, k, v, stat_grad: bool):
    g = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=g).to(out.device)).sum()
    if stat_grad:                                      # through the statistics too (softmax's lse)
        loss = loss + sum((x * torch.randn(x.shape, generator=g).to(x.device)).sum() for x in st.values())
    return torch.autograd.grad(loss, (q, k, v))


def _compare(got, want, tol):
    (out, st, grads), (out2, st2, grads2) = got, want
    torch.testing.assert_close(out, out2, atol=tol, rtol=tol, equal_nan=True)
    assert st.keys() == st2.keys()
    for name in st:
        torch.testing.assert_close(st[name], st2[name], atol=tol, rtol=tol, equal_nan=True)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b, atol=10 * tol, rtol=10 * tol, equal_nan=True)


def _both(monkeypatch, spy, q, k, v, cq, ck, norm, stat_grad=False, **kw):
    """(one-launch result, its launches), (per-sequence result, its flashmaps.attention calls)."""
    out, st = _run(q, k, v, cq, ck, norm, **kw)
    got = (out, st, _loss_grads(out, st, q, k, v, stat_grad))
    launches = spy.take()
    with monkeypatch.context() as m:
        m.setattr(triton_varlen, "supported", lambda *a: False)
        out2, st2 = _run(q, k, v, cq, ck, norm, **kw)
        want = (out2, st2, _loss_grads(out2, st2, q, k, v, stat_grad))
    return got, launches, want, spy.take()


@pytest.mark.parametrize("norm, causal, window, Hq, Hkv, deterministic, extra", [
    ("softmax", True, None, 4, 2, False, "strided"),      # upper-left, GQA, gradients through lse, strided q, k, v
    ("softmax", "lower_right", (3, 2), 2, 2, True, ""),   # a window, lower-right; the dQ kernel
    ("entmax15", "lower_right", None, 2, 1, False, ""),   # sparse, MQA
    ("taylor", False, (4, 0), 2, 1, False, "int64"),      # a causal window (lower-right aligned), int64 cu_seqlens
    ("topk:5", True, None, 2, 2, True, "softcap"),        # the pre-pass (scratch per sequence), softcap and scale
], ids=lambda x: str(x))
def test_one_launch_equals_each_sequence(monkeypatch, norm, causal, window, Hq, Hkv, deterministic, extra):
    spy = _Launches(monkeypatch)
    q, k, v, cq, ck = _packed(LENS_Q, LENS_K, Hq, Hkv, 16, 8)
    if extra == "strided":                             # every other head dim of wider tensors
        q, k, v = (torch.stack([x, x], -1).flatten(-2)[..., ::2].detach().requires_grad_() for x in (q, k, v))
        assert q.stride(2) == 2
    if extra == "int64":
        cq, ck = cq.long(), ck.long()
    kw = dict(softcap=5.0, scale=0.4) if extra == "softcap" else {}
    torch.use_deterministic_algorithms(deterministic)
    try:
        got, (kernels, calls), want, (_, loop_calls) = _both(monkeypatch, spy, q, k, v, cq, ck, norm,
                                                              stat_grad=norm == "softmax", causal=causal, window=window,
                                                              **kw)
    finally:
        torch.use_deterministic_algorithms(False)
    bwd = ["attn_bwd_dkdv", "attn_bwd_dq"] if deterministic else ["attn_bwd_dkdv"]
    assert (kernels, calls) == (["attn_fwd", "attn_bwd_preprocess", *bwd], 0)   # one launch per kernel, no loop
    assert loop_calls == len(LENS_Q)
    out, st, _ = got
    assert out.shape == (sum(LENS_Q), Hq, 8) and all(x.shape == (Hq, sum(LENS_Q)) for x in st.values())
    _compare(got, want, 1e-5)


@pytest.mark.parametrize("norm", TRITON_NORMS)
def test_registry_one_launch(monkeypatch, norm):
    """Every normalizer at one small shape, forward and backward: the one launch where `triton_varlen.supported`,
    else the per-sequence loop (stochastic units, sigmoid's key-count default): equal to the loop either way."""
    spy = _Launches(monkeypatch)
    lens_q, lens_k = [3, 0, 17, 2], [20, 2, 17, 0]
    q, k, v, cq, ck = _packed(lens_q, lens_k, 2, 1, 16, 16, seed=2)
    torch.manual_seed(0)
    got = _run(q, k, v, cq, ck, norm, causal="lower_right")
    got = (*got, _loss_grads(*got, q, k, v, False))
    kernels, calls = spy.take()
    nz = sum(1 for a, b in zip(lens_q, lens_k) if a and b)
    if triton_varlen.supported(flashmaps.parse(norm), 20, 0.0):
        assert (calls, kernels.count("attn_fwd")) == (0, 1)
    else:
        assert calls == len(lens_q) and kernels.count("attn_fwd") == nz
    torch.manual_seed(0)                               # the same seeds for the loop (stochastic units)
    with monkeypatch.context() as m:
        m.setattr(triton_varlen, "supported", lambda *a: False)
        want = _run(q, k, v, cq, ck, norm, causal="lower_right")
        want = (*want, _loss_grads(*want, q, k, v, False))
    _compare(got, want, 1e-5)


def test_fallbacks(monkeypatch):
    """Dropout and sigmoid's default b (= -log S_b per sequence) run per sequence; sigmoid with a given b and the
    empty batch cases run."""
    spy = _Launches(monkeypatch)
    q, k, v, cq, ck = _packed([4, 6], [9, 2], 2, 2, 16, 16)
    torch.manual_seed(3)
    out = flashmaps.attention_varlen(q, k, v, cq, ck, 6, 9, dropout_p=0.3, backend="triton")
    assert spy.take()[1] == 2 and torch.isfinite(out).all()
    torch.manual_seed(3)
    first = flashmaps.attention(q[:4].transpose(0, 1)[None], k[:9].transpose(0, 1)[None], v[:9].transpose(0, 1)[None],
                                dropout_p=0.3, backend="triton")
    torch.testing.assert_close(out[:4], first[0].transpose(0, 1))
    spy.take()
    assert not triton_varlen.supported(flashmaps.parse("sigmoid"), 9, 0.0)
    assert triton_varlen.supported(flashmaps.parse("sigmoid:-1.5"), 9, 0.0)
    flashmaps.attention_varlen(q, k, v, cq, ck, 6, 9, "sigmoid:-1.5", backend="triton")
    assert spy.take()[1] == 0
    empty = torch.zeros(3, dtype=torch.int32, device=KERNEL_DEVICE)
    out = flashmaps.attention_varlen(q[:0], k, v, empty, ck, 0, 9, backend="triton")
    assert out.shape == (0, 2, 16)


def test_nonfinite_rule_per_sequence(monkeypatch):
    """A NaN query row: its dq row and its own sequence's dk, dv of its kv head are NaN, as in the per-sequence
    calls (sparsemax: its threshold comparisons would drop the NaN without the rule); the other sequences'
    gradients are unchanged."""
    spy = _Launches(monkeypatch)
    q, k, v, cq, ck = _packed([4, 0, 6], [9, 3, 2], 2, 1, 16, 16)
    with torch.no_grad():
        q[5, 1, 0] = float("nan")                      # sequence 2, head 1
    got, (_, calls), want, _ = _both(monkeypatch, spy, q, k, v, cq, ck, "sparsemax")
    assert calls == 0
    _compare(got, want, 1e-5)
    dq, dk, dv = got[2]
    assert dq[5, 1].isnan().all() and not dq[:4].isnan().any() and dk[12:].isnan().all() and not dk[:12].isnan().any()


def test_bad_cu_seqlens_messages():
    """The checks are tensor ops with one host read; their messages name the argument and the bad value."""
    q, k, v, cq, ck = _packed([3, 4], [3, 4], 2, 2, 16, 16)
    with pytest.raises(ValueError, match=r"max_seqlen_k = 3 is less than the longest sequence \(4\)"):
        flashmaps.attention_varlen(q, k, v, cq, ck, 4, 3)
    with pytest.raises(ValueError, match=r"cu_seqlens_q must start at 0 and be non-decreasing, got \[1, 3, 7\]"):
        flashmaps.attention_varlen(q, k, v, cq + torch.tensor([1, 0, 0], dtype=torch.int32, device=cq.device), ck, 4, 4)
    with pytest.raises(ValueError, match=r"cu_seqlens_k must end at the number of packed rows \(7\), got 6"):
        flashmaps.attention_varlen(q, k, v, cq, torch.tensor([0, 3, 6], dtype=torch.int32, device=cq.device), 4, 4)
