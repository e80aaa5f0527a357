"""Issue 17 item 2 (host cost): the Triton path's host-side caches are keyed on everything that changes a result.

- One call after another through the same caches (`triton_path._PLANS`, `_MEMO`, the shared placeholder, the
  zero seed of `ops`), each differing from the previous one in one thing (dtype, key length, strides, scale,
  causal mode, mask kind, GQA with Dv != Dqk, normalizer, option, softcap), agrees with the float64 reference in
  the output and the gradients.
- A module knob that changes a unit's hooks (entmax15's NPTS) rebuilds the plan; the plans stay bounded.
- A Hooks record equal to the one the autotuner chose for (entmax15 builds a fresh one per call) finds that
  choice (`_CHOSEN`, keyed with `_Hashed`); a different one is tuned again.
"""

import pytest
import torch
from helpers import KERNEL_DEVICE, grad_err, grads, make_mask, qkv_for, reference_grads, rel_err
from test_host import _meta, launches  # noqa: F401  (the fixture: launches stubbed, fresh autotune caches)
from triton.runtime.autotuner import Autotuner

import flashmaps
from flashmaps import ops, triton_configs, triton_path
from flashmaps.kernels import entmax15 as entmax15_kernels

BASE = (1, 2, 2, 20, 24, 16, 16)           # (B, Hq, Hkv, L, S, Dqk, Dv)
#: consecutive calls, each differing from the one before in one thing
SEQUENCE = [
    ("softmax", torch.float32, BASE, {}),
    ("softmax", torch.bfloat16, BASE, {}),                                   # dtype
    ("softmax", torch.float32, (1, 2, 2, 20, 40, 16, 16), {}),               # S
    ("softmax", torch.float32, BASE, {"strides": "BLHD"}),                   # strides
    ("softmax", torch.float32, BASE, {"scale": 0.3}),                        # scale
    ("softmax", torch.float32, BASE, {"causal": "lower_right"}),             # causal
    ("softmax", torch.float32, BASE, {"attn_mask": "bool"}),                 # mask kinds
    ("softmax", torch.float32, BASE, {"attn_mask": "float"}),
    ("softmax", torch.float32, (1, 4, 2, 20, 24, 16, 8), {"enable_gqa": True}),   # GQA, Dv != Dqk
    ("entmax15", torch.float32, BASE, {}),                                   # normalizer
    ("entmax15", torch.float32, BASE, {"softcap": 5.0}),                     # softcap
    ("topk:3", torch.float32, BASE, {}),
    ("topk:5", torch.float32, BASE, {}),                                     # option
]


def _inputs(dtype, shape, kw):
    q, k, v = qkv_for(shape, dtype, device=KERNEL_DEVICE)
    kw = dict(kw)
    if kw.pop("strides", None) == "BLHD":           # (B, L, H, D) memory viewed as (B, H, L, D)
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    if "attn_mask" in kw:
        B, Hq, _, L, S = shape[:5]
        kw["attn_mask"] = make_mask(kw["attn_mask"], B, Hq, L, S, dtype=torch.float32)
    return q, k, v, kw


def test_consecutive_calls_through_the_caches_match_the_reference():
    for norm, dtype, shape, kw in SEQUENCE:
        q, k, v, kw = _inputs(dtype, shape, kw)
        before = [x.clone() for x in (q, k, v)]
        dout = torch.randn(q.shape[:3] + (v.shape[3],), generator=torch.Generator().manual_seed(3)).to(dtype)
        with torch.no_grad():
            out_ng = flashmaps.attention(q, k, v, norm, backend="triton", **kw)
        out, dq, dk, dv = grads(lambda a, b, c: flashmaps.attention(a, b, c, norm, backend="triton", **kw),
                                q, k, v, dout)
        ref = reference_grads(q, k, v, dout, norm, mask=kw.get("attn_mask"), causal=kw.get("causal"),
                              scale=kw.get("scale"), softcap=kw.get("softcap"))
        tol = 2e-2 if dtype == torch.bfloat16 else 2e-4
        case = f"{norm} {dtype} {shape} {sorted(kw)}"
        assert rel_err(out_ng, ref[0]) < tol and rel_err(out, ref[0]) < tol, case
        for got, want in zip((dq, dk, dv), ref[1:]):
            assert grad_err(got, want) < 5 * tol, case
        assert all(torch.equal(x, b) for x, b in zip((q, k, v), before)), case       # inputs not modified
    assert ops._ZERO_SEED.item() == 0


def test_plan_rebuilt_when_a_knob_changes_and_bounded(monkeypatch):
    norm = flashmaps.parse("entmax15")
    q, k, v = _meta(1, 2, 40, 16), _meta(1, 2, 70, 16), _meta(1, 2, 70, 16)
    ph = triton_path._placeholder(q.device)

    def setup(kk=k, vv=v, scale=None):
        return triton_path._setup(q, kk, vv, norm, None, None, scale, None, 0.0, 0, ph)

    first = setup()
    assert setup().static is first.static                          # the plan of this key, built once
    monkeypatch.setattr(entmax15_kernels, "NPTS", entmax15_kernels.NPTS + 1)
    again = setup()
    assert again.hooks == norm.triton(70)[0] and again.hooks != first.hooks
    monkeypatch.setattr(triton_path, "_PLANS", {})
    monkeypatch.setattr(triton_path, "_PLANS_MAX", 2)
    for i, S in enumerate((30, 50, 90)):
        c = setup(_meta(1, 2, S, 16), _meta(1, 2, S, 16), scale=0.1 * (i + 1))
        assert c.dims.S == S and c.scale.dist_scale == pytest.approx(0.1 * (i + 1))
        assert len(triton_path._PLANS) <= 2


def test_equal_hooks_find_the_autotuned_choice(launches, monkeypatch):  # noqa: F811
    runs = []
    tuned_run = Autotuner.run
    monkeypatch.setattr(Autotuner, "run", lambda self, *a, **kw: runs.append(self) or tuned_run(self, *a, **kw))
    monkeypatch.setattr(triton_path, "_INTERPRET", False)     # the GPU's autotuned launch
    norm = flashmaps.parse("entmax15")
    q, k, v = _meta(1, 2, 300, 64), _meta(1, 2, 400, 64), _meta(1, 2, 400, 64)
    assert norm.triton(400)[0] is not norm.triton(400)[0]        # a fresh (equal) record per call
    for _ in range(3):
        triton_path.launch_forward(q, k, v, norm)
    assert runs == [triton_configs.attn_fwd_tuned]
    monkeypatch.setattr(entmax15_kernels, "NPTS", entmax15_kernels.NPTS + 1)   # other hooks: another key
    triton_path.launch_forward(q, k, v, norm)
    assert len(runs) == 2
