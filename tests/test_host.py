"""Issue 17: the host side of the Triton path. Its launches are stubbed here (the kernels' ``run``; the
autotuner's timing), so these tests check what happens between the launches, not the kernels:

- no host sync: forward and backward run on ``meta`` tensors (shapes only: reading a device value, ``.item()``,
  ``bool(t)``, ``.tolist()``, ``nonzero``, raises there), so nothing on the path reads device data, which
  CUDA-graph capture needs (the split-KV plan included);
- the direct launch: after the autotuner chose a config for a key, later calls launch the kernel with it
  without going through the autotuner (``triton_path._launch``);
- on CUDA (``-m cuda``): a forward captured in a CUDA graph replays on new inputs, and so do forward and
  backward through ``torch.cuda.make_graphed_callables``.
"""

import pytest
import torch
from helpers import rel_err
from triton.runtime.autotuner import Autotuner

import flashmaps
from flashmaps import functional, triton_configs, triton_path

TUNERS = (triton_configs.attn_fwd_tuned, triton_configs.attn_bwd_dkdv_tuned, triton_configs.attn_bwd_dq_tuned)


def _blocks_time(self, *args, config, **kwargs):
    """The stubbed autotuner timing: larger blocks are 'faster' (a choice other than the first candidate)."""
    t = -float(config.kwargs["BM"] * 1000 + config.kwargs["BN"])
    return [t, t, t]


@pytest.fixture
def launches(monkeypatch):
    """Stub every kernel launch (recording (kernel, grid, kwargs)) and the autotuner's timing, on fresh
    autotune caches; allow the Triton path on non-CUDA (meta) tensors."""
    record = []
    monkeypatch.setattr(type(triton_path.attn_fwd), "run",
                        lambda self, *args, grid, warmup, **kwargs: record.append((self, grid, kwargs)))
    monkeypatch.setattr(Autotuner, "_bench", _blocks_time)
    for t in TUNERS:
        monkeypatch.setattr(t, "cache", {})
    monkeypatch.setattr(triton_path, "_CHOSEN", {})
    monkeypatch.setattr(functional, "_TRITON_OFF_CUDA", True)
    return record


def _meta(*shape, grad=False):
    return torch.empty(*shape, device="meta").requires_grad_(grad)


CASES = {  # id: (normalizer, Hq, Hkv, L, S, attention kwargs)
    "softmax": ("softmax", 2, 2, 40, 70, {}),
    "entmax15-causal": ("entmax15", 2, 2, 40, 70, {"causal": True}),
    "topk-bool-mask-gqa": ("topk:4", 4, 2, 40, 70, {"attn_mask": "bool", "enable_gqa": True}),
    "entmax15-float-mask-softcap": ("entmax15", 2, 2, 40, 70, {"attn_mask": "float", "softcap": 20.0}),
    "softmax-dropout": ("softmax", 2, 2, 40, 70, {"dropout_p": 0.1}),
    "softmax-decode-split": ("softmax", 2, 2, 1, 600, {}),   # split-KV: the plan and the merge
}


@pytest.mark.parametrize("case", CASES)
def test_no_host_sync_forward_backward(launches, case):
    """Forward (no grad) and forward + backward of the Triton path on meta tensors: a read of any device value
    on the path would raise."""
    norm, Hq, Hkv, L, S, kw = CASES[case]
    kw = dict(kw)
    if "attn_mask" in kw:
        kw["attn_mask"] = torch.empty(1, 1, L, S, device="meta", dtype=torch.bool if kw["attn_mask"] == "bool"
                                      else torch.float32)
    q, k, v = _meta(1, Hq, L, 16, grad=True), _meta(1, Hkv, S, 16, grad=True), _meta(1, Hkv, S, 16, grad=True)
    with torch.no_grad():
        out = flashmaps.attention(q, k, v, norm, backend="triton", **kw)
    assert out.shape == (1, Hq, L, 16) and out.device.type == "meta"
    n_fwd = len(launches)
    assert n_fwd >= 1
    if case == "softmax-decode-split":
        assert launches[-1][2]["ST"].SPLIT          # the split-KV launch was the one taken
        return
    out = flashmaps.attention(q, k, v, norm, backend="triton", **kw)
    out.backward(torch.empty_like(out))
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape
    # the forward again, then preprocess and dK/dV, and the dQ kernel unless dQ is added by the dK/dV kernel's
    # atomics (the default: deterministic=None with torch's deterministic mode off)
    assert len(launches) >= 2 * n_fwd + (3 if torch.are_deterministic_algorithms_enabled() else 2)


def test_direct_launch_after_autotune(launches, monkeypatch):
    """The first call of a key goes through the autotuner; the next ones launch the kernel with its choice
    (blocks, warps, stages and the grid from those blocks); another key is tuned again."""
    runs = []
    tuned_run = Autotuner.run
    monkeypatch.setattr(Autotuner, "run", lambda self, *a, **kw: runs.append(self) or tuned_run(self, *a, **kw))
    monkeypatch.setattr(triton_path, "_INTERPRET", False)     # the GPU's autotuned launch, not pinned 16 x 16 blocks
    norm = flashmaps.parse("softmax")
    q, k, v = _meta(1, 3, 300, 64), _meta(1, 3, 400, 64), _meta(1, 3, 400, 64)
    triton_path.launch_forward(q, k, v, norm)
    assert runs == [triton_configs.attn_fwd_tuned]
    best = triton_configs.attn_fwd_tuned.best_config
    assert best.kwargs["BM"] * 1000 + best.kwargs["BN"] == max(
        c.kwargs["BM"] * 1000 + c.kwargs["BN"] for c in triton_configs.attn_fwd_tuned.configs_timings)
    for _ in range(2):
        launches.clear()
        triton_path.launch_forward(q, k, v, norm)
        assert len(runs) == 1                                          # not through the autotuner again
        (kernel, grid, kw), = launches
        assert kernel is triton_path.attn_fwd
        assert {n: kw[n] for n in best.all_kwargs()} == best.all_kwargs()
        assert grid == (-(-300 // best.kwargs["BM"]), 3, 1)
    triton_path.launch_forward(q, _meta(1, 3, 5000, 64), _meta(1, 3, 5000, 64), norm)   # another S bucket
    assert len(runs) == 2


def _cuda_qkv(gen, L, S, grad=False):
    def rnd(n):
        return torch.randn(1, 8, n, 64, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_(grad)
    return rnd(L), rnd(S), rnd(S)


@pytest.mark.cuda
@pytest.mark.parametrize("norm", ["softmax", "entmax15"])
@pytest.mark.parametrize("L", [1, 256], ids=["decode", "L256"])
def test_cuda_graph_forward_replays(norm, L):
    """A no-grad forward captured once (after warm-up calls: the autotuner times the candidates outside the
    capture) replays on new inputs copied into the captured ones, as the eager call on those inputs."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = _cuda_qkv(gen, L, 1024)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):
            flashmaps.attention(q, k, v, norm)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = flashmaps.attention(q, k, v, norm)
    for _ in range(2):
        q2, k2, v2 = _cuda_qkv(gen, L, 1024)
        q.copy_(q2), k.copy_(k2), v.copy_(v2)
        graph.replay()
        with torch.no_grad():
            want = flashmaps.attention(q2, k2, v2, norm)
        torch.cuda.synchronize()
        assert rel_err(out, want) < 1e-3


@pytest.mark.cuda
@pytest.mark.parametrize("norm", ["softmax", "entmax15"])
def test_cuda_graph_forward_backward(norm):
    """Forward and backward captured by torch.cuda.make_graphed_callables give the eager gradients."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    sample = _cuda_qkv(gen, 256, 256, grad=True)
    graphed = torch.cuda.make_graphed_callables(lambda q, k, v: flashmaps.attention(q, k, v, norm), sample)
    q, k, v = _cuda_qkv(gen, 256, 256, grad=True)
    dout = torch.randn(1, 8, 256, 64, device="cuda", generator=gen).to(torch.bfloat16)
    out = graphed(q, k, v)
    out.backward(dout)
    q0, k0, v0 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out0 = flashmaps.attention(q0, k0, v0, norm)
    out0.backward(dout)
    assert rel_err(out, out0) < 1e-3
    for g, g0 in ((q.grad, q0.grad), (k.grad, k0.grad), (v.grad, v0.grad)):
        assert rel_err(g, g0) < 1e-2
