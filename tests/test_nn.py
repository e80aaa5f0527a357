"""flashmaps.nn.Attention: shapes, GQA head mapping, causality, every normalizer, dropout, bad arguments.

The module is compared with its own projections pushed through the float64 dense reference
(flashmaps.reference.attention) by rel_err = ||out - ref|| / ||ref||.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import NORMS, pin_seed, rel_err

import flashmaps
from flashmaps import reference
from flashmaps.nn import Attention

NORMALIZERS = NORMS


def manual(mod: Attention, x, context=None, *, attn_mask=None, causal=None, noise_seed=0):
    """The module's computation written out, attention by the float64 reference. -> (B, L, E) float64."""
    context = x if context is None else context
    B, L, _ = x.shape
    S = context.shape[1]
    d = torch.float64

    def lin(layer, t):
        return F.linear(t.to(d), layer.weight.to(d), None if layer.bias is None else layer.bias.to(d))

    q = lin(mod.q_proj, x).view(B, L, mod.num_heads, mod.head_dim).transpose(1, 2)  # (B, H, L, D)
    k = lin(mod.k_proj, context).view(B, S, mod.num_kv_heads, mod.head_dim).transpose(1, 2)  # (B, Hkv, S, D)
    v = lin(mod.v_proj, context).view(B, S, mod.num_kv_heads, mod.head_dim).transpose(1, 2)  # (B, Hkv, S, D)
    out = reference.attention(
        q, k, v, mod.normalizer, causal=mod.causal if causal is None else causal, attn_mask=attn_mask,
        scale=mod.scale, softcap=mod.softcap, enable_gqa=mod.num_kv_heads != mod.num_heads, noise_seed=noise_seed,
    )  # (B, H, L, D)
    out = out.transpose(1, 2).reshape(B, L, -1)  # (B, L, H*D)
    return lin(mod.out_proj, out)  # (B, L, E)


SELF_CASES = [
    pytest.param(2, 7, 32, 4, 4, id="B2-L7-E32-H4-Hkv4"),
    pytest.param(1, 1, 24, 3, 1, id="B1-L1-E24-H3-Hkv1"),
    pytest.param(3, 33, 48, 6, 2, id="B3-L33-E48-H6-Hkv2"),
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("B,L,E,H,Hkv", SELF_CASES)
def test_self_attention_matches_reference(B, L, E, H, Hkv, causal):
    torch.manual_seed(0)
    mod = Attention(E, H, num_kv_heads=Hkv, causal=causal).eval()
    x = torch.randn(B, L, E)
    y = mod(x)
    assert y.shape == (B, L, E) and y.dtype == x.dtype
    assert rel_err(y, manual(mod, x)) < 1e-5


@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_every_normalizer_with_softcap_and_head_dim(normalizer):
    torch.manual_seed(1)
    mod = Attention(20, 2, num_kv_heads=1, head_dim=12, normalizer=normalizer, softcap=3.0, scale=0.5).eval()
    x = torch.randn(2, 9, 20) * 2
    assert mod.normalizer == flashmaps.parse(normalizer)
    noise_seed = pin_seed(normalizer)
    assert rel_err(mod(x), manual(mod, x, noise_seed=noise_seed)) < 1e-5


def test_normalizer_instance_accepted_and_changes_output():
    torch.manual_seed(2)
    soft = Attention(16, 2).eval()
    top = Attention(16, 2, normalizer=flashmaps.TopK(1)).eval()
    top.load_state_dict(soft.state_dict())
    x = torch.randn(1, 6, 16)
    assert rel_err(top(x), soft(x)) > 1e-3  # a real top-1 is not softmax
    assert rel_err(top(x), manual(top, x)) < 1e-5


@pytest.mark.parametrize("causal", [False, "lower_right"], ids=["full", "lower_right"])
def test_cross_attention_kv_dim_and_padding_mask(causal):
    torch.manual_seed(3)
    B, L, S, E, C = 2, 5, 11, 16, 24
    mod = Attention(E, 4, num_kv_heads=2, kv_dim=C, causal=causal, bias=False).eval()
    x, ctx = torch.randn(B, L, E), torch.randn(B, S, C)
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[1, :4] = False  # left padding in the second context
    mask = keep[:, None, None, :]  # (B, 1, 1, S)
    y = mod(x, ctx, attn_mask=mask)
    assert y.shape == (B, L, E)
    assert mod.q_proj.bias is None
    assert rel_err(y, manual(mod, x, ctx, attn_mask=mask)) < 1e-5
    # the padded context entries do not matter
    ctx2 = ctx.clone()
    ctx2[1, :4] = 100.0
    assert torch.allclose(mod(x, ctx2, attn_mask=mask), y, atol=1e-5)


def test_gqa_equals_repeated_kv_heads():
    """num_kv_heads=2 with 6 query heads == 6 kv heads holding copies: query head h reads kv head h // 3."""
    torch.manual_seed(4)
    E, H, Hkv, D = 24, 6, 2, 4
    gqa = Attention(E, H, num_kv_heads=Hkv).eval()
    mha = Attention(E, H).eval()
    with torch.no_grad():
        mha.q_proj.load_state_dict(gqa.q_proj.state_dict())
        mha.out_proj.load_state_dict(gqa.out_proj.state_dict())
        for name in ("k_proj", "v_proj"):
            src, dst = getattr(gqa, name), getattr(mha, name)
            dst.weight.copy_(src.weight.view(Hkv, D, E).repeat_interleave(H // Hkv, 0).reshape(H * D, E))
            dst.bias.copy_(src.bias.view(Hkv, D).repeat_interleave(H // Hkv, 0).reshape(H * D))
    x = torch.randn(2, 8, E)
    assert rel_err(gqa(x), mha(x)) < 1e-5


def test_causal_ignores_the_future_and_call_override():
    torch.manual_seed(5)
    mod = Attention(16, 4, causal=True).eval()
    x = torch.randn(1, 10, 16)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(1, 4, 16)
    y, y2 = mod(x), mod(x2)
    assert torch.allclose(y[:, :6], y2[:, :6], atol=1e-6)
    assert not torch.allclose(y[:, 6:], y2[:, 6:], atol=1e-3)
    # causal=False for one call: the first rows now see the changed tail
    assert not torch.allclose(mod(x, causal=False)[:, :6], mod(x2, causal=False)[:, :6], atol=1e-3)
    assert rel_err(mod(x, causal=False), manual(mod, x, causal=False)) < 1e-5


def test_dropout_only_in_training_and_gradients():
    torch.manual_seed(6)
    mod = Attention(16, 2, normalizer="entmax15", dropout=0.5)
    x = torch.randn(2, 12, 16, requires_grad=True)
    mod.eval()
    y_eval = mod(x)
    assert rel_err(y_eval, manual(mod, x)) < 1e-5  # no dropout in eval mode
    mod.train()
    torch.manual_seed(7)
    y_a = mod(x)
    torch.manual_seed(7)
    y_b = mod(x)
    assert rel_err(y_a, y_eval) > 1e-2  # dropout is applied
    assert torch.equal(y_a, y_b)  # and seeded by torch's default generator
    y_a.square().mean().backward()
    grads = [x.grad] + [p.grad for p in mod.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)


def test_repr_mentions_the_configuration():
    text = repr(Attention(32, 8, num_kv_heads=2, normalizer="topk:4", causal=True))
    assert "num_kv_heads=2" in text and "topk:4" in text and "upper_left" in text


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(embed_dim=30, num_heads=4), "not divisible"),
        (dict(embed_dim=32, num_heads=4, num_kv_heads=3), "multiple of num_kv_heads"),
        (dict(embed_dim=32, num_heads=0), "num_heads must be a positive int"),
        (dict(embed_dim=True, num_heads=1), "embed_dim must be a positive int"),
        (dict(embed_dim=32, num_heads=4, head_dim=-1), "head_dim must be a positive int"),
        (dict(embed_dim=32, num_heads=4, normalizer="nosuchmap"), "unknown normalizer"),
        (dict(embed_dim=32, num_heads=4, normalizer="topk"), "needs k"),
        (dict(embed_dim=32, num_heads=4, dropout=1.0), "dropout_p must be in"),
        (dict(embed_dim=32, num_heads=4, causal="diagonal"), "causal must be"),
        (dict(embed_dim=32, num_heads=4, softcap=0.0), "softcap must be"),
    ],
    ids=["indivisible", "kv-heads", "zero-heads", "bool-dim", "head-dim", "normalizer", "topk-no-k",
         "dropout", "causal", "softcap"],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Attention(**kwargs)


def test_bad_forward_arguments():
    mod = Attention(16, 2)
    with pytest.raises(ValueError, match="x must be"):
        mod(torch.randn(4, 16))
    with pytest.raises(ValueError, match="x must be"):
        mod(torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="context must be"):
        mod(torch.randn(1, 4, 16), torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="does not broadcast"):
        mod(torch.randn(1, 4, 16), attn_mask=torch.ones(3, 3, dtype=torch.bool))
    cross = Attention(16, 2, kv_dim=8)
    with pytest.raises(ValueError, match="pass context"):
        cross(torch.randn(1, 4, 16))
    with pytest.raises(ValueError, match="kv_dim=8"):
        cross(torch.randn(1, 4, 16), torch.randn(1, 5, 16))
