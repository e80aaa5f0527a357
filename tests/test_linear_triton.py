"""The Triton linear form of Taylor attention (kernels/linear.py, under the interpreter here): outputs, the
statistic z and gradients against the float64 dense reference and the quadratic Triton kernel, chunk
boundaries at awkward lengths (the kernel's chunk is 16 rows), masks, several Dv blocks, low precision,
strided inputs, the refusals and the choice of form on the Triton backend. ``cuda`` tests: real sizes.

Ladder: reference.attention (dense, float64) is the ground truth; the quadratic taylor Triton kernel is the
same function computed in another order; the torch linear form (tests/test_linear.py) the same order.
"""

import pytest
import torch
from helpers import KERNEL_DEVICE, check_stats, grad_err, qkv_for, ref_grads, ref_stats, rel_err

import flashmaps
from flashmaps import linear

CAUSAL = [None, "upper_left", "lower_right"]
CAUSAL_IDS = ["noncausal", "upper_left", "lower_right"]


def _run(q, k, v, form, **kw):
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out, st = flashmaps.attention(q, k, v, "taylor", enable_gqa=True, backend="triton", form=form,
                                  return_stats=True, **kw)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return out, st, dout, torch.autograd.grad(out, (q, k, v), dout.to(device=out.device, dtype=out.dtype))


def _check(shape, causal, mask=None, dtype=torch.float32, tol=2e-5, quadratic=True):
    """Triton linear vs the float64 reference (out, z, dq, dk, dv) and, if ``quadratic``, vs the quadratic
    Triton kernel."""
    q, k, v = qkv_for(shape, dtype, device=KERNEL_DEVICE)
    mask = None if mask is None else mask.to(KERNEL_DEVICE)
    out, st, dout, got = _run(q, k, v, "linear", causal=causal or False, attn_mask=mask)
    ref, ref_grad = ref_grads(q, k, v, "taylor", causal=causal or False, attn_mask=mask)
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel_err(out, ref) < tol, rel_err(out, ref)
    check_stats(st, ref_stats(q.double(), k.double(), "taylor", causal=causal, mask=mask), tol)
    want = ref_grad(dout.to(KERNEL_DEVICE))
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == dtype and grad_err(a, b) < 4 * tol, (f"d{name}", grad_err(a, b))
    if quadratic:
        qout, _, _, qgot = _run(q, k, v, "quadratic", causal=causal or False, attn_mask=mask)
        assert rel_err(out, qout) < 2 * tol
        for name, a, b in zip("qkv", got, qgot):
            assert grad_err(a, b) < 8 * tol, (f"d{name} vs quadratic", grad_err(a, b))


@pytest.mark.parametrize("causal", CAUSAL, ids=CAUSAL_IDS)
@pytest.mark.parametrize("L", [1, 15, 16, 17])
def test_triton_linear_chunk_boundaries(L, causal):
    # GQA (2 query heads per kv head), Dv != D; S = L + 2 so that lower_right has a prefix of keys
    _check((1, 2, 1, L, L + 2, 16, 8), causal)


@pytest.mark.parametrize("L, S, causal", [
    pytest.param(170, 163, None, id="L170-S163-noncausal"),
    pytest.param(170, 163, "upper_left", id="L170-S163-upper_left"),
    pytest.param(170, 163, "lower_right", id="L170-S163-lower_right"),
    pytest.param(1000, 1003, "lower_right", id="L1000-S1003-lower_right"),  # ~10 s under the interpreter
])
def test_triton_linear_long(L, S, causal):
    # many chunks and a partial one; lower_right's diagonal blocks straddle chunk edges (S - L not a
    # multiple of 16), with empty rows (S < L) or a prefix of keys every row sees (S > L)
    _check((1, 1, 1, L, S, 16, 16), causal, quadratic=False)


@pytest.mark.parametrize("shape", [
    pytest.param((1, 2, 2, 40, 17, 5, 3), id="B1-Hq2-Hkv2-L40-S17-D5-Dv3"),        # D padded; empty rows
    pytest.param((1, 2, 1, 33, 40, 32, 16), id="B1-Hq2-Hkv1-L33-S40-D32-Dv16"),     # the largest D
    pytest.param((1, 1, 1, 33, 40, 16, 72), id="B1-Hq1-Hkv1-L33-S40-D16-Dv72"),     # 3 Dv blocks of 32
])
@pytest.mark.parametrize("causal", [None, "lower_right"], ids=["noncausal", "lower_right"])
def test_triton_linear_shapes(shape, causal):
    _check(shape, causal, quadratic=False)


@pytest.mark.parametrize("shape", [
    pytest.param((1, 2, 1, 70, 77, 16, 8), id="B1-Hq2-Hkv1-L70-S77-D16-Dv8"),      # S > L: a key prefix
    pytest.param((1, 1, 1, 70, 45, 8, 40), id="B1-Hq1-Hkv1-L70-S45-D8-Dv40"),      # empty rows, 2 Dv blocks
])
@pytest.mark.parametrize("causal", CAUSAL, ids=CAUSAL_IDS)
def test_triton_linear_segments(monkeypatch, shape, causal):
    """Forward and backward in segments of 32 rows (3 here, the last partial; the GPU's split): each starts
    from the prefix sum of the per-segment key pieces and, for dk, dv, the suffix sum of the row pieces;
    key padding on the first shape."""
    monkeypatch.setattr(linear, "TRITON_SEG_ROWS", 32)
    assert linear._segments(shape[3], 1, 16, torch.device("cpu")) == (3, 32)
    mask = None
    if shape[5] == 16:
        mask = torch.rand(1, 1, 1, shape[4], generator=torch.Generator().manual_seed(4)) < 0.7
    _check(shape, causal, mask=mask, quadratic=False)


# ----------------------------------------------------------------------------------------------------
# wide heads (D > 32): the order-2 features split over programs (feature blocks), partial sums reduced


@pytest.fixture
def four_blocks(monkeypatch):
    """Feature blocks of 1024 order-2 features: 4 blocks at D = 64 (the default 128 gives 32; the same code,
    an eighth of the interpreted programs), and Dv blocks of 16 (Dv = 24: 2 Dv blocks x 4 feature blocks)."""
    monkeypatch.setattr(linear, "TRITON_FEATURES", 1024)
    assert linear._triton_blocks(64, 24) == (64, 16, 16, 16)  # TA = 16 rows of x x^T per block, BD // TA = 4


@pytest.mark.parametrize("causal", CAUSAL, ids=CAUSAL_IDS)
@pytest.mark.parametrize("L, S", [(1, 3), (17, 19), (40, 37)], ids=["L1-S3", "L17-S19", "L40-S37"])
def test_triton_linear_wide_heads(four_blocks, L, S, causal):
    # D = 64 (the acceptance's), GQA, Dv = 24 != D (one partial Dv block)
    _check((1, 2, 1, L, S, 64, 24), causal)


@pytest.mark.parametrize("causal", ["lower_right", None], ids=["lower_right", "noncausal"])
def test_triton_linear_wide_heads_default_blocks(causal):
    """The default split at D = 64: 32 blocks of 128 features (state 128 x 64), key padding on the causal one."""
    assert linear._triton_blocks(64, 40) == (64, 64, 2, 8)
    mask = None
    if causal:
        mask = torch.rand(1, 1, 1, 19, generator=torch.Generator().manual_seed(6)) < 0.7
    _check((1, 1, 1, 17, 19, 64, 8), causal, mask=mask, quadratic=False)


@pytest.mark.parametrize("causal", ["upper_left", "lower_right", None], ids=["upper_left", "lower_right", "noncausal"])
def test_triton_linear_wide_heads_segments(monkeypatch, four_blocks, causal):
    """D = 48 (padded to 64) in segments of 16 rows (3 here): each feature block stores and loads its rows of
    the segment states; key padding per query head."""
    monkeypatch.setattr(linear, "TRITON_SEG_ROWS", 16)
    mask = torch.rand(1, 2, 1, 45, generator=torch.Generator().manual_seed(8)) < 0.7
    _check((1, 2, 1, 40, 45, 48, 16), causal, mask=mask, quadratic=False)


def test_triton_linear_widest_heads(four_blocks):
    """D = 100, padded to BD = 128 (TRITON_MAX_D): 16 feature blocks of 8 rows of x x^T here (the default, 128
    blocks of one row, is the same code at 8x the interpreted programs)."""
    assert linear._triton_blocks(100, 4)[2] == 8
    _check((1, 2, 1, 20, 23, 100, 4), "lower_right", quadratic=False)


@pytest.mark.parametrize("per_head", [False, True], ids=["mask-B11S", "mask-BHq1S"])
@pytest.mark.parametrize("causal", [None, "upper_left"], ids=["noncausal", "upper_left"])
def test_triton_linear_key_padding(per_head, causal):
    B, Hq, Hkv, L, S = 2, 4, 2, 20, 37
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(B, Hq if per_head else 1, 1, S, generator=g) < 0.6
    mask[1, 0] = False  # batch 1 (head 0): no key at all -> zero rows, zero gradients
    _check((B, Hq, Hkv, L, S, 8, 4), causal, mask=mask, quadratic=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_triton_linear_low_precision(dtype):
    """fp16/bf16 inputs, fp32 state: within the inputs' rounding of the float64 reference."""
    _check((1, 2, 1, 40, 40, 16, 16), "upper_left", dtype=dtype, tol=1e-2, quadratic=False)


def test_triton_linear_strided_inputs_not_modified():
    """q, k, v as (B, L, H, D) buffers seen through transposes (no copy needed), left unchanged."""
    B, H, L, D = 1, 2, 24, 16
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, L, H, D, generator=g).transpose(1, 2).to(KERNEL_DEVICE) for _ in range(3))
    copies = [x.clone() for x in (q, k, v)]
    out, _, dout, got = _run(q, k, v, "linear", causal=True)
    ref, ref_grad = ref_grads(q, k, v, "taylor", causal=True)
    assert rel_err(out, ref) < 2e-5
    for a, b in zip(got, ref_grad(dout.to(KERNEL_DEVICE))):
        assert grad_err(a, b) < 1e-4
    for x, c in zip((q, k, v), copies):
        assert torch.equal(x, c)


def test_triton_backward_saves_only_inputs_and_outputs():
    """The Triton form also keeps only q, k, v, out and z for backward (memory flat in L)."""
    q, k, v = (x.requires_grad_() for x in qkv_for((1, 2, 2, 64, 64, 16, 16), torch.float32, device=KERNEL_DEVICE))
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = flashmaps.attention(q, k, v, "taylor", causal=True, form="linear", backend="triton")
    budget = sum(x.numel() * x.element_size() for x in (q, k, v, out)) + out[..., 0].numel() * 4
    assert 0 < sum(saved) <= budget


# ----------------------------------------------------------------------------------------------------
# refusals and the choice of form on the Triton backend


def test_triton_linear_refuses_wide_heads():
    assert linear.TRITON_MAX_D == 128
    q, k, v = qkv_for((1, 2, 2, 64, 64, 129, 64), torch.float32, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match=f"D <= {linear.TRITON_MAX_D}"):
        flashmaps.attention(q, k, v, "taylor", form="linear", backend="triton")
    choice = flashmaps.choose_form(q, k, v, "taylor", causal=True, backend="triton")
    assert choice.form == "quadratic" and f"D <= {linear.TRITON_MAX_D}" in choice.reason
    with pytest.raises(ValueError, match="dense mask"):
        q, k, v = qkv_for((1, 2, 2, 64, 64, 16, 16), torch.float32, device=KERNEL_DEVICE)
        mask = torch.ones(64, 64, dtype=torch.bool, device=KERNEL_DEVICE).tril()
        flashmaps.attention(q, k, v, "taylor", form="linear", backend="triton", attn_mask=mask)


def test_triton_auto_picks_the_kernel_by_the_cost_model(monkeypatch):
    q, k, v = qkv_for((1, 2, 2, 4096, 4096, 16, 16), torch.float32, device=KERNEL_DEVICE)
    long = flashmaps.choose_form(q, k, v, "taylor", causal=True, backend="triton")
    assert long.form == "linear" and "Triton kernel" in long.reason
    assert (long.cost_quadratic, long.cost_linear) == linear.costs(4096, 4096, 16, 16, True, linear.TRITON_CHUNK,
                                                                   "triton")
    short = flashmaps.choose_form(q[:, :, :64], k[:, :, :64], v[:, :, :64], "taylor", causal=True, backend="triton")
    assert short.form == "quadratic" and short.cost_quadratic <= short.cost_linear
    # D in (TRITON_AUTO_MAX_D, TRITON_MAX_D]: the kernel runs when asked, "auto" keeps the quadratic one
    q32, k32, v32 = qkv_for((1, 2, 2, 4096, 4096, 32, 16), torch.float32, device=KERNEL_DEVICE)
    wide = flashmaps.choose_form(q32, k32, v32, "taylor", causal=True, backend="triton")
    assert linear.TRITON_AUTO_MAX_D < 32 <= linear.TRITON_MAX_D
    assert wide.form == "quadratic" and "spills registers" in wide.reason
    asked = flashmaps.choose_form(q32, k32, v32, "taylor", causal=True, backend="triton", form="linear")
    assert asked.form == "linear" and "Triton kernel" in asked.reason
    # D = 64: the split kernel, weighed with its features (BD^2 + NF (1 + BD) = 4096 + 32 * 65): linear from
    # about S = 12.5k causal at Dv = 64
    q64, k64, v64 = (torch.empty(1, 2, n, 64, device=KERNEL_DEVICE) for n in (16384, 16384, 16384))
    far = flashmaps.choose_form(q64, k64, v64, "taylor", causal=True, backend="triton")
    assert far.form == "linear" and "Triton kernel" in far.reason
    assert far.cost_linear == linear.costs(16384, 16384, 64, 64, True, 16, "triton")[1]
    assert far.cost_linear == pytest.approx(2 * 16384 * (4096 + 32 * 65) * 65 + 16384 * 8 * 128)
    near = flashmaps.choose_form(q64[:, :, :8192], k64[:, :, :8192], v64[:, :, :8192], "taylor", causal=True,
                                 backend="triton")
    assert near.form == "quadratic" and near.cost_quadratic <= near.cost_linear
    # the full-square features cost more than the torch form's pairs (D = 16: 273 vs 153)
    assert linear.costs(4096, 4096, 16, 16, True, 16, "triton")[1] > linear.costs(4096, 4096, 16, 16, True, 16)[1]
    called = []

    def fake(q, k, v, *args):
        called.append(args)
        return q.new_zeros(*q.shape[:3], v.shape[3]), q.new_ones(q.shape[:3])

    monkeypatch.setattr(linear, "_triton_forward", fake)
    flashmaps.attention(q, k, v, "taylor", causal=True, backend="triton")
    assert called  # auto ran the Triton linear kernel
    called.clear()
    flashmaps.attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], "taylor", causal=True, backend="triton")
    assert not called


# ----------------------------------------------------------------------------------------------------
# real sizes (GPU sessions)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", CAUSAL, ids=CAUSAL_IDS)
@pytest.mark.parametrize("D, Dv", [(16, 64), (16, 128), (32, 64)], ids=["D16-Dv64", "D16-Dv128", "D32-Dv64"])
def test_cuda_triton_linear_real_sizes(D, Dv, causal, dtype):
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3  # TF32 products over a 4k state
    _check((2, 8, 2, 4096 - 3, 4096, D, Dv), causal, dtype=dtype, tol=tol)


# ----------------------------------------------------------------------------------------------------
# the bench provider, its FLOP count and the GPU plan


def _hand_count_linear(mode, L, S, D, Dv, causal, C):
    """Multiply-adds x 2 of the Triton linear kernel, chunk by chunk (flops.linear_flops's docstring)."""
    F = D + D * D  # orders 1 and 2, full square
    off = None if causal is None else (0 if causal == "upper_left" else S - L)
    entered = S if off is None else min(S, max(0, L + off))  # keys that enter the state
    fwd = bwd = 0
    for i0 in range(0, L, C):
        rows = min(L, i0 + C) - i0
        fwd += rows * F * (Dv + 1)                      # phi(q') U
        bwd += 2 * rows * F * (Dv + 1)                  # dy U^T, the reverse state
        if off is not None:
            fwd += rows * C * (D + Dv)                  # s, A v over the diagonal tile
            bwd += rows * C * (2 * D + Dv + 2 * D + 2 * Dv)
    fwd += entered * F * (Dv + 1)                       # phi(k) [v, 1]^T
    bwd += 3 * entered * F * (Dv + 1)                   # the state again, dv and dk from the reverse state
    return 2 * {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


@pytest.mark.parametrize("causal", CAUSAL, ids=CAUSAL_IDS)
@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
@pytest.mark.parametrize("L, S", [(37, 37), (20, 50), (50, 20)])
def test_linear_flops_hand_count(L, S, mode, causal):
    from flashmaps.bench import flops

    assert flops.linear_flops(mode, 1, 1, L, S, 16, 8, causal) == _hand_count_linear(mode, L, S, 16, 8, causal, 16)
    assert flops.linear_flops(mode, 2, 3, L, S, 16, 8, causal) == 6 * _hand_count_linear(mode, L, S, 16, 8, causal, 16)


def test_triton_linear_provider_counts_its_own_flops(monkeypatch):
    """flashmaps-taylor-triton-linear is in the CUDA list, runs (interpreted smoke) and its rows count
    flops.linear_flops; the taylor-linear GPU suite has its rows (and none without taylor)."""
    from flashmaps.bench import flops, providers, suites, worker

    assert "flashmaps-taylor-triton-linear" in {p.name for p in providers.providers_for("cuda", ["taylor"])}
    assert "flashmaps-taylor-triton-linear" not in {p.name for p in providers.providers_for("cpu", ["taylor"])}
    jobs = suites.suite_jobs(["taylor-linear"], suites.Plan(device="cpu", smoke=True, normalizers=("taylor",)))
    assert {j["provider"] for j in jobs} >= {"flashmaps-taylor-triton-linear", "flashmaps-taylor-triton-quadratic"}
    assert not suites.suite_jobs(["taylor-linear"], suites.Plan(normalizers=("softmax",)))
    monkeypatch.setenv("FLASHMAPS_BENCH_INTERPRET", "1")
    job = next(j for j in jobs if j["provider"] == "flashmaps-taylor-triton-linear" and j["mode"] == "fwd")
    row = worker.run_job(dict(job, check_rows=0))
    assert row["status"] == "ok", row["message"]
    args = (row["B"], row["Hq"], row["L"], row["S"], row["Dqk"], row["Dv"], row["causal"])
    assert row["flops"] == flops.linear_flops("fwd", *args) != flops.attention_flops("fwd", *args)


# ----------------------------------------------------------------------------------------------------
# the custom ops (compile safety), both backends of the linear form


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_ops_opcheck(backend):
    dtype = torch.float64 if backend == "torch" else torch.float32
    q, k, v = (x.requires_grad_() for x in qkv_for((1, 2, 1, 20, 23, 16, 8), dtype, device=KERNEL_DEVICE))
    km = (torch.rand(1, 1, 1, 23, generator=torch.Generator().manual_seed(2)) < 0.7).to(KERNEL_DEVICE)
    args = (q, k, v, km, 3, 0.3, 1.0, 1.0, 0.5, 16, backend)
    torch.library.opcheck(torch.ops.flashmaps.linear_fwd.default, args)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_compile_fullgraph(backend):
    """A model calling the linear form compiles without graph breaks and gives the eager loss and grads."""
    torch._dynamo.reset()
    q, k, v = qkv_for((1, 2, 1, 40, 40, 16, 8), torch.float32, device=KERNEL_DEVICE)

    def model(q, k, v):
        return flashmaps.attention(q * 2, k, v, "taylor", causal=True, form="linear", backend=backend,
                                   enable_gqa=True).square().sum()

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    qs = [q.clone().requires_grad_() for _ in range(2)]
    loss_c, loss_e = compiled(qs[0], k, v), model(qs[1], k, v)
    loss_c.backward()
    loss_e.backward()
    assert rel_err(loss_c, loss_e) < 1e-6 and rel_err(qs[0].grad, qs[1].grad) < 1e-5
