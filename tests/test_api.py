"""The public API: argument checking (every bad input class) and sdpa()'s drop-in semantics vs torch."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import NORMS, pin_seed, rel_err

import flashmaps
from flashmaps import reference



def qkv(B=2, Hq=4, Hkv=4, L=9, S=11, D=8, Dv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    Dv = Dv or D
    q = torch.randn(B, Hq, L, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, Dv, generator=g).to(dtype)
    return q, k, v


# ---------------------------------------------------------------------------------------------------
# normalizer specs


def test_normalizer_names_and_parse():
    assert flashmaps.names()[0] == "softmax" and {"softmax", "taylor", "entmax15", "topk"} <= set(flashmaps.names())
    assert flashmaps.parse("softmax") == flashmaps.Softmax()
    assert flashmaps.parse(" TopK:64 ") == flashmaps.TopK(64)
    assert flashmaps.parse(flashmaps.TopK(3)) is not None
    assert str(flashmaps.TopK(7)) == "topk:7" and flashmaps.parse(str(flashmaps.TopK(7))) == flashmaps.TopK(7)
    with pytest.raises(Exception):  # frozen
        flashmaps.TopK(3).k = 4


@pytest.mark.parametrize(
    "spec,exc,words",
    [
        ("sofmax", ValueError, ["unknown normalizer", "'softmax'", "'topk:<k>'"]),
        ("topk", ValueError, ["topk:<k>"]),
        ("topk:", ValueError, ["topk:<k>"]),
        ("topk:abc", ValueError, ["malformed", "topk:<k>"]),
        ("topk:0", ValueError, ["k >= 1"]),
        ("topk:-3", ValueError, ["k >= 1"]),
        ("topk:2.5", ValueError, ["malformed"]),
        ("softmax:3", ValueError, ["takes no argument"]),
        (3, TypeError, ["normalizer must be a string"]),
        (flashmaps.Softmax, TypeError, ["instance"]),
    ],
    ids=lambda x: repr(x) if not isinstance(x, list) else "",
)
def test_bad_normalizer(spec, exc, words):
    q, k, v = qkv()
    with pytest.raises(exc) as info:
        flashmaps.attention(q, k, v, spec)
    for w in words:
        assert w in str(info.value)


def test_topk_class_validation():
    with pytest.raises(ValueError, match="k must be >= 1"):
        flashmaps.TopK(0)
    with pytest.raises(TypeError, match="positive int"):
        flashmaps.TopK(2.0)
    with pytest.raises(TypeError, match="positive int"):
        flashmaps.TopK(True)


# ---------------------------------------------------------------------------------------------------
# bad input at the boundary


def _bad_cases():
    q, k, v = qkv()
    return {
        "q-not-tensor": (dict(q=q.tolist()), TypeError, "q must be a torch.Tensor"),
        "q-3d": (dict(q=q[0]), ValueError, "q must be 4-D"),
        "k-5d": (dict(k=k[None]), ValueError, "k must be 4-D"),
        "int-dtype": (dict(q=q.long(), k=k.long(), v=v.long()), TypeError, "dtype"),
        "mixed-dtype": (dict(k=k.half()), TypeError, "share one dtype"),
        "batch-mismatch": (dict(k=k[:1], v=v[:1]), ValueError, "batch sizes differ"),
        "kv-len-mismatch": (dict(v=v[:, :, :5]), ValueError, "same sequence length"),
        "head-dim-mismatch": (dict(k=k[..., :4]), ValueError, "same head dim"),
        "kv-heads-mismatch": (dict(v=v[:, :2]), ValueError, "same number of heads"),
        "gqa-needs-flag": (dict(k=k[:, :2], v=v[:, :2]), ValueError, "enable_gqa=True"),
        "gqa-not-multiple": (dict(k=k[:, :3], v=v[:, :3], enable_gqa=True), ValueError, "multiple"),
        "mask-no-broadcast": (dict(attn_mask=torch.ones(3, 11, dtype=torch.bool)), ValueError, "does not broadcast"),
        "mask-int": (dict(attn_mask=torch.ones(9, 11, dtype=torch.int64)), TypeError, "attn_mask has dtype"),
        "mask-list": (dict(attn_mask=[[True]]), TypeError, "attn_mask must be a torch.Tensor"),
        "mask-5d": (dict(attn_mask=torch.ones(1, 2, 4, 9, 11, dtype=torch.bool)), ValueError, "attn_mask"),
        "mask-grad": (dict(attn_mask=torch.zeros(9, 11, requires_grad=True)), ValueError, "detach"),
        "causal-bad": (dict(causal="lower"), ValueError, "causal must be"),
        "causal-int": (dict(causal=2), ValueError, "causal must be"),
        "softcap-zero": (dict(softcap=0.0), ValueError, "softcap must be"),
        "softcap-neg": (dict(softcap=-1), ValueError, "softcap must be"),
        "softcap-str": (dict(softcap="30"), TypeError, "softcap"),
        "scale-str": (dict(scale="0.1"), TypeError, "scale"),
        "scale-nan": (dict(scale=float("nan")), ValueError, "scale"),
        "backend-bad": (dict(backend="cuda"), ValueError, "backend must be one of"),
        "dropout-1": (dict(dropout_p=1.0), ValueError, "dropout_p must be in [0, 1)"),
        "dropout-neg": (dict(dropout_p=-0.1), ValueError, "dropout_p must be in [0, 1)"),
        "return-stats-str": (dict(return_stats="yes"), TypeError, "return_stats"),
        "deterministic-str": (dict(deterministic="yes"), TypeError, "deterministic must be None, True or False"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input(case):
    q, k, v = qkv()
    kwargs, exc, words = _bad_cases()[case]
    args = dict(q=q, k=k, v=v)
    for name in ("q", "k", "v"):
        if name in kwargs:
            args[name] = kwargs.pop(name)
    before = [t.clone() for t in (q, k, v)]
    with pytest.raises(exc) as info:
        flashmaps.attention(args["q"], args["k"], args["v"], **kwargs)
    assert words in str(info.value)
    for t, b in zip((q, k, v), before):  # inputs never modified, even on error paths
        assert torch.equal(t, b)


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    q, k, v = qkv()
    monkeypatch.setattr(flashmaps.functional, "_TRITON_OFF_CUDA", False)   # (read once, at import)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        flashmaps.attention(q, k, v, backend="triton")


def test_triton_backend_rejects_float64():
    q, k, v = qkv(dtype=torch.float64)
    with pytest.raises(TypeError, match="float64 needs backend='torch'"):
        flashmaps.attention(q, k, v, backend="triton")


def test_sdpa_bad_input():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="Explicit attn_mask should not be set when is_causal=True"):
        flashmaps.sdpa(q, k, v, attn_mask=torch.ones(9, 11, dtype=torch.bool), is_causal=True)
    with pytest.raises(ValueError, match="at least 2 dimensional, but got query.dim: 1"):
        flashmaps.sdpa(q[0, 0, 0], k[0, 0], v[0, 0])
    with pytest.raises(ValueError, match="do not broadcast"):
        flashmaps.sdpa(q, k[:, :, None], v[:, :, None])
    with pytest.raises(ValueError, match="enable_gqa=True"):
        flashmaps.sdpa(q, k[:, :2], v[:, :2])
    with pytest.raises(ValueError, match="must divide the number of heads"):
        flashmaps.sdpa(q, k[:, :3], v[:, :3], enable_gqa=True)
    with pytest.raises(ValueError, match="dropout_p"):
        flashmaps.sdpa(q, k, v, dropout_p=1.5)
    with pytest.raises(TypeError, match="is_causal must be a bool"):
        flashmaps.sdpa(q, k, v, is_causal="yes")
    with pytest.raises(TypeError, match="to have the same dtype, but got query.dtype: torch.float32"):
        flashmaps.sdpa(q, k.double(), v)
    with pytest.raises(ValueError, match="unknown normalizer"):
        flashmaps.sdpa(q, k, v, normalizer="relu")


def _sdpa_error(fn):
    """The exception fn raises (None if it returns)."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the point is which classes it is
        return e
    return None


@pytest.mark.parametrize(
    "bad",
    [
        dict(attn_mask=torch.ones(9, 11, dtype=torch.bool), is_causal=True),
        dict(dropout_p=1.5),
        dict(attn_mask=torch.ones(9, 11, dtype=torch.int64)),
        dict(attn_mask=torch.ones(8, 11)),
        dict(dtype=torch.float64),
        dict(rank1=True),
        dict(heads=3),
        dict(is_causal=1),
        dict(normalizer="relu"),
    ],
    ids=["mask+causal", "dropout", "int-mask", "mask-shape", "dtypes", "rank1", "heads", "causal-type", "normalizer"],
)
def test_sdpa_errors_are_caught_like_torch(bad):
    """Every sdpa error is caught by ``except RuntimeError`` (torch's class) and by ``except ValueError`` or
    ``except TypeError`` (flashmaps'); where torch raises too, both raise."""
    bad = dict(bad)
    q, k, v = qkv()
    if bad.pop("dtype", None) is not None:
        k = k.double()
    if bad.pop("rank1", False):
        q = q[0, 0, 0]
    heads = bad.pop("heads", None)
    if heads is not None:
        k, v = k[:, :heads], v[:, :heads]
    norm = bad.pop("normalizer", "softmax")
    ours = _sdpa_error(lambda: flashmaps.sdpa(q, k, v, normalizer=norm, **bad))
    assert isinstance(ours, RuntimeError) and isinstance(ours, (ValueError, TypeError)), repr(ours)
    if norm == "softmax" and bad.get("is_causal") is not True:  # torch's math path takes mask + is_causal
        theirs = _sdpa_error(lambda: F.scaled_dot_product_attention(q, k, v, **bad))
        assert theirs is not None, "torch accepts what flashmaps refuses"


@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_empty_batch_like_torch(is_causal):
    q, k, v = torch.randn(0, 2, 5, 8), torch.randn(0, 2, 6, 8), torch.randn(0, 2, 6, 4)
    out = flashmaps.sdpa(q, k, v, is_causal=is_causal)
    assert out.shape == F.scaled_dot_product_attention(q, k, v, is_causal=is_causal).shape == (0, 2, 5, 4)


# ---------------------------------------------------------------------------------------------------
# semantics through the default (CPU) path


@pytest.mark.parametrize("norm", NORMS)
def test_empty_query_and_empty_keys(norm):
    q, k, v = qkv(L=0)
    out = flashmaps.attention(q, k, v, norm)
    assert out.shape == (2, 4, 0, 8)
    q, k, v = qkv(S=0)
    q.requires_grad_(True)
    out, stats = flashmaps.attention(q, k, v, norm, return_stats=True)
    assert out.shape == (2, 4, 9, 8) and torch.equal(out, torch.zeros_like(out))
    assert set(stats) == set(flashmaps.parse(norm).stats)
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


def _torch_sdpa_ref(*args, **kw):
    return F.scaled_dot_product_attention(*args, **kw)


@pytest.mark.parametrize(
    "shape_q,shape_k",
    [
        ((3, 9, 8), (3, 11, 8)),  # 3-D: no head dim
        ((2, 3, 4, 9, 8), (2, 3, 4, 11, 8)),  # 5-D
        ((2, 4, 1, 8), (2, 4, 11, 8)),  # L = 1
        ((9, 8), (11, 8)),  # 2-D
        ((9, 8), (2, 4, 11, 8)),  # ranks differ
        ((2, 4, 9, 8), (1, 4, 11, 8)),  # batch broadcast
        ((2, 4, 9, 8), (2, 1, 11, 8)),  # one kv head broadcast
        ((3, 9, 8), (1, 11, 8)),  # 3-D, broadcast
    ],
    ids=["3d", "5d", "L1", "2d", "ranks", "batch-bcast", "head-bcast", "3d-bcast"],
)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_sdpa_ranks_match_torch(shape_q, shape_k, is_causal):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(shape_q, generator=g)
    k = torch.randn(shape_k, generator=g)
    v = torch.randn(shape_k[:-1] + (6,), generator=g)
    out = flashmaps.sdpa(q, k, v, is_causal=is_causal)
    ref = _torch_sdpa_ref(q, k, v, is_causal=is_causal)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize(
    "mask_shape",
    [(9, 11), (1, 11), (4, 1, 11), (2, 1, 9, 11), (2, 4, 9, 11), (11,)],
    ids=lambda s: "mask" + "x".join(map(str, s)),
)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_masks_broadcast_like_torch(mask_shape, kind):
    q, k, v = qkv(seed=3)
    g = torch.Generator().manual_seed(4)
    if kind == "bool":
        mask = torch.rand(mask_shape, generator=g) > 0.3
        mask[..., 0] = True  # keep every row non-empty so torch's and our semantics coincide
    else:
        mask = torch.randn(mask_shape, generator=g)
    out = flashmaps.sdpa(q, k, v, attn_mask=mask)
    # torch itself rejects a 1-D mask in some versions: give it the explicitly expanded mask
    ref = _torch_sdpa_ref(q, k, v, attn_mask=mask.expand(2, 4, 9, 11))
    assert rel_err(out, ref) < 1e-5


def test_sdpa_scale_gqa_dtype_and_causal_bias():
    from torch.nn.attention.bias import causal_lower_right, causal_upper_left

    q, k, v = qkv(Hq=6, Hkv=2, L=7, S=12, seed=5)
    for kw in (dict(scale=0.3), dict(enable_gqa=True, scale=None)):
        if "enable_gqa" not in kw:
            kk, vv = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)
        else:
            kk, vv = k, v
        assert rel_err(flashmaps.sdpa(q, kk, vv, **kw), _torch_sdpa_ref(q, kk, vv, **kw)) < 1e-5
    for bias, causal in ((causal_upper_left(7, 12), "upper_left"), (causal_lower_right(7, 12), "lower_right")):
        out = flashmaps.sdpa(q, k, v, attn_mask=bias, enable_gqa=True)
        ref = reference.attention(q, k, v, causal=causal, enable_gqa=True)
        assert rel_err(out, ref) < 1e-5
        torch_out = _torch_sdpa_ref(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=bias)
        assert rel_err(out, torch_out) < 1e-5
    with pytest.raises(ValueError, match="causal bias was built for"):
        flashmaps.sdpa(q, k, v, attn_mask=causal_upper_left(5, 12), enable_gqa=True)
    with pytest.raises(ValueError, match="is_causal=True"):
        flashmaps.sdpa(q, k, v, attn_mask=causal_upper_left(7, 12), is_causal=True, enable_gqa=True)
    qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
    out = flashmaps.sdpa(qb, kb, vb, enable_gqa=True)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, reference.attention(qb, kb, vb, enable_gqa=True)) < 2e-2


def test_sdpa_fully_masked_rows_are_zero_like_torch():
    q, k, v = qkv(seed=6)
    mask = torch.ones(9, 11, dtype=torch.bool)
    mask[2] = False
    out = flashmaps.sdpa(q, k, v, attn_mask=mask)
    ref = _torch_sdpa_ref(q, k, v, attn_mask=mask)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("norm", NORMS)
def test_sdpa_normalizer_matches_attention(norm):
    q, k, v = qkv(seed=7)
    noise_seed = pin_seed(norm)
    out = flashmaps.sdpa(q, k, v, is_causal=True, normalizer=norm)
    ref = reference.attention(q, k, v, norm, causal=True, noise_seed=noise_seed)
    assert rel_err(out, ref) < 1e-5


def test_sdpa_dropout():
    q, k, v = qkv(B=4, Hq=4, L=16, S=64, seed=8)
    torch.manual_seed(0)
    a = flashmaps.sdpa(q, k, v, dropout_p=0.5)
    torch.manual_seed(0)
    b = flashmaps.sdpa(q, k, v, dropout_p=0.5)
    c = flashmaps.sdpa(q, k, v, dropout_p=0.5)
    base = flashmaps.sdpa(q, k, v)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, base)
    assert torch.isfinite(a).all()
    # dropout is unbiased: the mean over many draws approaches the no-dropout output
    torch.manual_seed(1)
    mean = torch.stack([flashmaps.sdpa(q, k, v, dropout_p=0.5) for _ in range(64)]).mean(0)
    assert rel_err(mean, base) < 0.25


@pytest.mark.parametrize("norm", NORMS)
def test_inputs_not_modified(norm):
    q, k, v = qkv(seed=9)
    mask = torch.randn(9, 11)
    mask[0, 3] = float("-inf")
    saved = [t.clone() for t in (q, k, v, mask)]
    for t in (q, k, v):
        t.requires_grad_(True)
    out = flashmaps.attention(q, k, v, norm, attn_mask=mask, causal="lower_right", softcap=5.0)
    out.square().sum().backward()
    for t, s in zip((q, k, v, mask), saved):
        assert torch.equal(t.detach(), s)


def test_version_and_exports():
    assert flashmaps.__version__
    for name in ("attention", "sdpa", "Softmax", "Taylor", "Entmax15", "TopK", "normalizers", "reference"):
        assert hasattr(flashmaps, name)


@pytest.mark.cuda
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_sdpa_cuda_matches_torch(is_causal):
    """On the GPU flashmaps.sdpa (default backend: Triton) against torch's own SDPA, bf16, with GQA and a
    broadcast bool mask; gradients too."""
    g = torch.Generator().manual_seed(41)
    q = torch.randn(2, 8, 300, 64, generator=g).cuda().bfloat16().requires_grad_(True)
    k = torch.randn(2, 2, 300, 64, generator=g).cuda().bfloat16().requires_grad_(True)
    v = torch.randn(2, 2, 300, 64, generator=g).cuda().bfloat16().requires_grad_(True)
    mask = None if is_causal else (torch.rand(300, 300, generator=g) > 0.2).cuda()
    out = flashmaps.sdpa(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=is_causal,
                                         enable_gqa=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.float())
    assert out.dtype == torch.bfloat16 and out.is_cuda
    assert rel_err(out, ref) < 2e-2
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < 3e-2


def test_readme_table_is_the_registry():
    """The README's table of normalizers is the registry's (regenerate: python -m flashmaps.normalizers
    --readme README.md)."""
    import pathlib

    from flashmaps.normalizers.__main__ import with_table

    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert with_table(readme) == readme


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("norm", NORMS)
def test_merge_of_a_key_partition_equals_the_full_call(norm, backend):
    """flashmaps.merge over a random partition of the keys (three parts, one of them empty for some rows)
    equals the call over all keys, for every unit: by the merge rule of independent parts, or by the two-phase
    protocol of the sparse units (which refuse independent parts clearly)."""
    from helpers import KERNEL_DEVICE

    device = "cpu" if backend == "torch" else KERNEL_DEVICE
    q, k, v = (x.to(device) for x in qkv(B=2, Hq=4, Hkv=2, L=9, S=23, D=8, Dv=6))
    part = torch.randint(0, 3, (23,), generator=torch.Generator().manual_seed(3))
    part[:2] = 2                       # keys 0 and 1 in part 2: early causal rows have no key in parts 0, 1
    pin_seed(norm)                     # a stochastic normalizer: every call below draws the same noise
    full, st_full = flashmaps.attention(q, k, v, norm, causal=True, enable_gqa=True, return_stats=True,
                                        backend=backend)
    causal = torch.arange(23)[None, :] <= torch.arange(9)[:, None]                   # (L, S)
    outs, stats = [], []
    nrm = flashmaps.parse(norm)
    for p in range(1 if nrm.two_phase else 3):         # a two-phase unit: one independent part (refused below)
        mask = (causal & (part == p)[None, :]).to(device)
        pin_seed(norm)
        o, st = flashmaps.attention(q, k, v, norm, attn_mask=mask, enable_gqa=True, return_stats=True,
                                    backend=backend)
        outs.append(o)
        stats.append(st)
    if nrm.two_phase:                    # a global threshold: independent parts refuse, the two-phase protocol merges
        with pytest.raises(ValueError, match="two-phase"):
            flashmaps.merge(norm, outs, stats)
        outs, stats = _two_phase_parts(q, k, v, norm, [(causal & (part == p)[None, :]).to(device) for p in range(3)],
                                       backend)
        thr = stats.pop()
        with pytest.raises(ValueError, match="not computed at it"):          # an independent part is caught
            flashmaps.merge(norm, outs[:2] + [o], stats[:2] + [st], threshold=thr)
        out, st = flashmaps.merge(norm, outs, stats, threshold=thr)
    else:
        out, st = flashmaps.merge(norm, outs, stats)
    assert rel_err(out, full) < 1e-5
    for name in nrm.stats:            # infinities (top-k's tau of a row with <= k keys) equal, the rest close
        fin = torch.isfinite(st_full[name])
        assert torch.equal(st[name][~fin].cpu(), st_full[name][~fin].cpu()), name
        assert rel_err(st[name][fin], st_full[name][fin]) < 1e-5, name


def _two_phase_parts(q, k, v, norm, masks, backend):
    """The two-phase protocol over the key parts given by ``masks``: (outs, stats + [the union's threshold])."""
    thr = flashmaps.global_threshold(norm, [flashmaps.threshold_candidates(q, k, norm, attn_mask=m, enable_gqa=True)
                                            for m in masks])
    outs, stats = [], []
    for m in masks:
        o, st = flashmaps.attention(q, k, v, norm, attn_mask=m, enable_gqa=True, return_stats=True, backend=backend,
                                    threshold=thr)
        outs.append(o)
        stats.append(st)
    return outs, stats + [thr]


def test_merge_rejects_bad_input():
    q, k, v = qkv()
    o, st = flashmaps.attention(q, k, v, return_stats=True)
    with pytest.raises(TypeError, match="non-empty list"):
        flashmaps.merge("softmax", o, st)
    with pytest.raises(ValueError, match="exactly"):
        flashmaps.merge("softmax", [o, o], [st, {"z": st["lse"]}])
    with pytest.raises(ValueError, match="shape"):
        flashmaps.merge("softmax", [o, o[:, :, :3]], [st, st])


@pytest.mark.parametrize("norm", [n for n in NORMS if flashmaps.parse(n).two_phase])
def test_two_phase_merge_is_exact_in_float64(norm):
    """The two-phase protocol is exact, not merely close: four random key parts in float64 on the torch path,
    with peaked (spread 4: small supports) and flat (spread 0.1: every key in the support) scores, against the
    float64 reference (outputs and statistics to 1e-12); the merged weights' mass (v = ones) is 1."""
    for spread in (4.0, 0.1):
        q, k, v = (x.double() for x in qkv(B=1, Hq=2, Hkv=2, L=6, S=64, D=8, seed=1))
        q = q * spread
        v = torch.cat([v, torch.ones_like(v[..., :1])], -1)
        part = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(5))
        masks = [(part == p).expand(1, 2, 6, 64) for p in range(4)]
        outs, stats = _two_phase_parts(q, k, v, norm, masks, "torch")
        thr = stats.pop()
        out, st = flashmaps.merge(norm, outs, stats, threshold=thr)
        ref = reference.attention(q, k, v, norm)
        assert rel_err(out, ref) < 1e-12, spread
        assert (out[..., -1] - 1).abs().max().item() < 1e-12
        s, allowed = reference.scores_and_allowed(q, k, normalizer=flashmaps.parse(norm))
        for name, want in flashmaps.parse(norm).reference_stats(s, allowed).items():
            torch.testing.assert_close(st[name], want, rtol=1e-12, atol=1e-12)


@dataclasses.dataclass(frozen=True)
class _TopKWithoutThresholdGrads(flashmaps.TopK):
    candidate_threshold_grad = flashmaps.Normalizer.candidate_threshold_grad


def test_two_phase_rejects_bad_input():
    """The two-phase protocol's errors name the argument and say what to do."""
    q, k, v = qkv(L=5, S=12)
    thr = flashmaps.global_threshold("topk:3", [flashmaps.threshold_candidates(q, k, "topk:3")])
    assert set(thr) == {"tau", "cut"} and thr["tau"].shape == q.shape[:3]
    with pytest.raises(ValueError, match="no two-phase protocol"):
        flashmaps.threshold_candidates(q, k, "softmax")
    with pytest.raises(ValueError, match="no two-phase protocol"):
        flashmaps.attention(q, k, v, "softmax", threshold=thr)
    with pytest.raises(ValueError, match="missing the entry"):
        flashmaps.attention(q, k, v, "topk:3", threshold={"tau": thr["tau"]})
    with pytest.raises(ValueError, match=r"threshold\['tau'\] must be"):
        flashmaps.attention(q, k, v, "topk:3", threshold={"tau": thr["tau"][:, :, :2], "cut": thr["cut"]})
    no_grads = _TopKWithoutThresholdGrads(3)       # a two-phase unit without the gradient hooks: refused clearly
    assert flashmaps.parse("topk:3").has_threshold_grads and not no_grads.has_threshold_grads
    with pytest.raises(ValueError, match="gradients through the two-phase protocol are not provided"):
        flashmaps.attention(q.requires_grad_(), k, v, no_grads, threshold=thr)
    with pytest.raises(ValueError, match="gradients through the two-phase protocol are not provided"):
        flashmaps.global_threshold(no_grads, [thr["tau"][..., None].clone().requires_grad_()])
    with pytest.raises(ValueError, match="dropout"):
        flashmaps.attention(q.detach(), k, v, "topk:3", threshold=thr, dropout_p=0.1)
    with pytest.raises(TypeError, match="non-empty list"):
        flashmaps.global_threshold("topk:3", flashmaps.threshold_candidates(q.detach(), k, "topk:3"))
    o, st = flashmaps.attention(q.detach(), k, v, "softmax", return_stats=True)
    with pytest.raises(ValueError, match="threshold= is the two-phase"):
        flashmaps.merge("softmax", [o], [st], threshold=thr)


def test_eager_call_does_not_import_dynamo():
    """An eager call (forward and backward) leaves torch._dynamo unimported: it costs seconds and 140 MiB."""
    import subprocess
    import sys

    code = (
        "import sys, torch, flashmaps\n"
        "q = torch.randn(1, 1, 8, 8, requires_grad=True)\n"
        "flashmaps.attention(q, q, q, 'entmax15').sum().backward()\n"
        "flashmaps.sdpa(q, q, q).sum().backward()\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"
