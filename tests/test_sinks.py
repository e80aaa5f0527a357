"""Attention sinks (flashmaps.sinks, ``attention(..., sinks=)``): outputs and gradients (q, k, v and the sinks)
against an independent float64 reference (the sink appended as one more logit with a zero value, then dropped),
on the torch path (gradcheck) and in the Triton kernels (interpreter), the refusals, and gpt-oss through the
transformers integration against "eager".
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import KERNEL_DEVICE, grad_err, mask_for, qkv_for, rel_err  # noqa: E402

import flashmaps  # noqa: E402
from flashmaps import reference  # noqa: E402
from flashmaps.normalizers import parse  # noqa: E402
from flashmaps.normalizers.rows import masked_softmax  # noqa: E402

SINK_NORMS = ["softmax", "topk:3"]


def sink_reference(q, k, v, sinks, normalizer="softmax", **kw):
    """float64 dense: the normalizer's weights over the allowed keys plus the sink logit (always allowed),
    the sink's column dropped. topk: the sink joins the kept keys (the tau_k of the keys alone)."""
    s, allowed = reference.scores_and_allowed(q, k, enable_gqa=True, **kw)          # (B, Hq, L, S)
    B, Hq, L, S = s.shape
    norm = parse(normalizer)
    if norm.name == "topk":
        from flashmaps.normalizers import topk_threshold

        allowed = allowed & (s >= topk_threshold(s, allowed, norm.k))
    sk = sinks.to(s.dtype).view(1, Hq, 1, 1).expand(B, Hq, L, 1)
    p = masked_softmax(torch.cat([s, sk], -1), torch.cat([allowed, torch.ones_like(allowed[..., :1])], -1))
    kv = v.to(s.dtype).repeat_interleave(Hq // v.shape[1], dim=1)
    return torch.matmul(p[..., :S], kv)


SHAPES = [pytest.param((2, 4, 2, 7, 11, 8, 8), id="B2-Hq4-Hkv2-L7-S11-D8"),
          pytest.param((1, 2, 1, 5, 5, 8, 12), id="B1-Hq2-Hkv1-L5-S5-Dqk8-Dv12")]


@pytest.mark.parametrize("norm, mask_kind, causal", [
    ("softmax", "none", None), ("softmax", "bool-B1LS-emptyrows", "lower_right"), ("topk:3", "none", "lower_right"),
    ("topk:3", "bool-B1LS-emptyrows", None)])
@pytest.mark.parametrize("shape", SHAPES)
def test_torch_path_gradcheck(shape, norm, mask_kind, causal):
    q, k, v = (x.requires_grad_() for x in qkv_for(shape, torch.float64))
    mask = mask_for(mask_kind, shape, torch.float64)
    sinks = torch.randn(shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(3)).requires_grad_()

    def fn(q, k, v, sinks):
        return flashmaps.attention(q, k, v, norm, sinks=sinks, causal=causal or False, attn_mask=mask,
                                   enable_gqa=True, backend="torch")

    want = sink_reference(q, k, v, sinks, norm, causal=causal or False, attn_mask=mask)
    assert rel_err(fn(q, k, v, sinks), want) < 1e-12
    assert torch.autograd.gradcheck(fn, (q, k, v, sinks), fast_mode=True)


def test_sigmoid_form_and_stats():
    """out = out_softmax * sigmoid(lse - sink); the returned lse includes the sink; an empty row stays 0."""
    shape = (2, 4, 2, 7, 11, 8, 8)
    q, k, v = qkv_for(shape, torch.float64)
    mask = mask_for("bool-B1LS-emptyrows", shape, torch.float64)
    sinks = torch.linspace(-2, 2, 4, dtype=torch.float64)
    out0, st0 = flashmaps.attention(q, k, v, "softmax", attn_mask=mask, enable_gqa=True, return_stats=True,
                                    backend="torch")
    out, st = flashmaps.attention(q, k, v, "softmax", sinks=sinks, attn_mask=mask, enable_gqa=True,
                                  return_stats=True, backend="torch")
    w = torch.sigmoid(st0["lse"] - sinks.view(1, -1, 1))
    assert rel_err(out, out0 * w[..., None]) < 1e-13
    assert torch.allclose(st["lse"], torch.logaddexp(st0["lse"], sinks.view(1, -1, 1)))
    empty = ~mask.expand(2, 4, 7, 11).any(-1)
    assert empty.any() and (out[empty] == 0).all()


@pytest.mark.parametrize("norm, causal", [("softmax", "upper_left"), ("topk:3", None)])
def test_triton_kernels(norm, causal):
    """The Triton path (interpreter on the CPU) in fp32 against float64 autograd of the reference: out, dq,
    dk, dv and dsinks; GQA, Dqk != Dv, a float mask with excluded keys."""
    shape = (1, 4, 2, 20, 37, 16, 24)
    q, k, v = qkv_for(shape, torch.float32, device=KERNEL_DEVICE)
    mask = mask_for("float-inf-min-emptyrow", shape, torch.float32).to(KERNEL_DEVICE)
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(5)).to(KERNEL_DEVICE)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, sinks)]
    out = flashmaps.attention(*leaves[:3], norm, sinks=leaves[3], causal=causal or False, attn_mask=mask,
                              enable_gqa=True, backend="triton")
    ref_leaves = [x.detach().double().cpu().requires_grad_() for x in (q, k, v, sinks)]
    ref = sink_reference(*ref_leaves[:3], ref_leaves[3], norm, causal=causal or False, attn_mask=mask.cpu())
    assert rel_err(out, ref) < 1e-5
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    got = torch.autograd.grad(out, leaves, dout.to(out.dtype).to(out.device))
    want = torch.autograd.grad(ref, ref_leaves, dout)
    for name, a, b in zip(["q", "k", "v", "sinks"], got, want):
        assert grad_err(a, b) < 1e-4, (name, grad_err(a, b))


@pytest.mark.parametrize("norm", ["entmax15", "sparsemax", "taylor", "entmax:1.25"])
def test_refused_where_undefined(norm):
    q, k, v = qkv_for((1, 2, 2, 3, 4, 8, 8), torch.float32)
    with pytest.raises(ValueError, match="sinks"):
        flashmaps.attention(q, k, v, norm, sinks=torch.zeros(2), backend="torch")


@pytest.mark.parametrize("bad", [torch.zeros(3), torch.zeros(2, 1), torch.zeros(2, dtype=torch.int64), [0.0, 0.0]],
                         ids=["len3", "2x1", "int", "list"])
def test_bad_sinks(bad):
    q, k, v = qkv_for((1, 2, 2, 3, 4, 8, 8), torch.float32)
    with pytest.raises(ValueError, match=r"sinks must be a float tensor of shape \(Hq,\)"):
        flashmaps.attention(q, k, v, "softmax", sinks=bad, backend="torch")


# ----------------------------------------------------------------------------------------------------
# transformers: gpt-oss passes its sinks as s_aux


def test_attention_forward_passes_s_aux():
    from flashmaps.integrations import transformers as fm_hf

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 4, 8, generator=g).transpose(1, 2)
    k, v = (torch.randn(2, 6, 2, 8, generator=g).transpose(1, 2) for _ in range(2))
    sinks = torch.randn(4, generator=g)
    layer = torch.nn.Module().eval()
    out, _ = fm_hf.attention_forward(layer, q, k, v, None, s_aux=sinks)          # (B, L, Hq, D), causal
    want = sink_reference(q.double(), k.double(), v.double(), sinks, causal="upper_left").transpose(1, 2)
    assert rel_err(out, want) < 1e-5


@pytest.mark.hf
def test_gpt_oss_matches_eager():
    hf = pytest.importorskip("transformers")
    from flashmaps.integrations import transformers as fm_hf

    fm_hf.register()
    config = hf.GptOssConfig(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                             num_experts_per_tok=2, sliding_window=6, max_position_embeddings=64,
                             layer_types=["sliding_attention", "full_attention"], initializer_range=0.2,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = hf.GptOssForCausalLM._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():                       # sinks large enough to matter
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 96, (3, 14), generator=g)
    mask = torch.ones(3, 14, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :9] = 0
    ids[mask == 0] = 0
    real = mask.bool()

    def run(impl):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits

    ref = run("eager")
    out = run("fmaps_softmax")
    assert rel_err(out[real], ref[real]) < 1e-5
    # the sinks matter: without them (zeroed to -inf weight) the logits move
    with torch.no_grad():
        saved = [layer.self_attn.sinks.clone() for layer in model.model.layers]
        for layer in model.model.layers:
            layer.self_attn.sinks.fill_(-1e4)
    try:
        assert rel_err(run("fmaps_softmax")[real], ref[real]) > 1e-3
    finally:
        with torch.no_grad():
            for layer, s in zip(model.model.layers, saved):
                layer.self_attn.sinks.copy_(s)


def test_opcheck_with_sinks():
    """The custom op with the optional sinks input: fake tensor, autograd and compile consistency."""
    q, k, v = (x.requires_grad_() for x in qkv_for((1, 2, 2, 5, 7, 8, 8), torch.float64))
    sinks = torch.randn(2, dtype=torch.float64, requires_grad=True)
    args = (q, k, v, None, torch.zeros((), dtype=torch.int64), "torch", "softmax", "upper_left", 0.3, None, 0.0,
            True, None, sinks)
    torch.library.opcheck(torch.ops.flashmaps.attention_fwd.default, args)
