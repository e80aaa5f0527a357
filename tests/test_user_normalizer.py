"""A user-defined normalizer, exactly as the README's "Write your own normalizer" shows it: the README's code
block is written to a module of its own (outside the package) and imported, then used through
flashmaps.attention, sdpa, nn.Attention and the transformers integration, on both backends, forward and
backward."""

import importlib.util
import pathlib
import re
import sys

import pytest
import torch
from helpers import KERNEL_DEVICE, grads, make_qkv, reference_grads, rel_err

import flashmaps

ROOT = pathlib.Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Write your own normalizer"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def relu2(tmp_path_factory):
    """The README's relu2.py, imported from a directory outside the package; unregistered afterwards."""
    path = tmp_path_factory.mktemp("user") / "relu2.py"
    path.write_text(_readme_example())
    spec = importlib.util.spec_from_file_location("relu2", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["relu2"] = module
    spec.loader.exec_module(module)
    yield module
    flashmaps.unregister("relu2")
    sys.modules.pop("relu2", None)


def test_registered_everywhere(relu2):
    assert "relu2" in flashmaps.names() and flashmaps.parse("relu2") == relu2.ReLU2()
    assert flashmaps.ReLU2 is relu2.ReLU2 and flashmaps.ReLU2().has_triton
    assert "| `relu2` |" in flashmaps.normalizers.table()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("causal", [False, "lower_right"])
def test_forward_and_backward_match_the_reference(relu2, backend, causal):
    device = "cpu" if backend == "torch" else KERNEL_DEVICE
    q, k, v = make_qkv(2, 4, 2, 23, 37, 16, Dv=24, device=device, seed=3)
    dout = torch.randn(2, 4, 23, 24, generator=torch.Generator().manual_seed(4)).to(device)
    mask = (torch.rand(2, 1, 23, 37, generator=torch.Generator().manual_seed(5)) < 0.8).to(device)
    got = grads(lambda *a: flashmaps.attention(*a, "relu2", causal=causal, attn_mask=mask, enable_gqa=True,
                                               backend=backend), q, k, v, dout)
    ref = reference_grads(q, k, v, dout, "relu2", causal=causal, mask=mask)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert rel_err(a, b) < 1e-4, name
    _, stats = flashmaps.attention(q, k, v, "relu2", causal=causal, attn_mask=mask, enable_gqa=True,
                                   backend=backend, return_stats=True)
    assert set(stats) == {"z"} and stats["z"].shape == (2, 4, 23)


def test_gradcheck_torch_path(relu2):
    q, k, v = (x.double().requires_grad_() for x in make_qkv(1, 2, 1, 5, 7, 4, device="cpu", seed=6))
    q.data += 0.5                                           # away from relu's kink at 0
    assert torch.autograd.gradcheck(lambda *a: flashmaps.attention(*a, "relu2", enable_gqa=True), (q, k, v),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


def test_sdpa_and_nn_attention(relu2):
    q, k, v = make_qkv(2, 4, 4, 9, 9, 8, device="cpu", seed=7)
    out = flashmaps.sdpa(q, k, v, is_causal=True, normalizer="relu2")
    assert rel_err(out, flashmaps.reference.attention(q, k, v, "relu2", causal=True)) < 1e-5
    mod = flashmaps.nn.Attention(32, 4, normalizer="relu2", causal=True)
    x = torch.randn(2, 9, 32, requires_grad=True)
    y = mod(x)
    y.square().sum().backward()
    assert y.shape == (2, 9, 32) and torch.isfinite(x.grad).all()


@pytest.mark.hf
def test_transformers_name(relu2):
    pytest.importorskip("transformers")
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from flashmaps.integrations import transformers as fm_hf

    assert "fmaps_relu2" in fm_hf.register()
    fn = ALL_ATTENTION_FUNCTIONS["fmaps_relu2"]
    q, k, v = make_qkv(1, 4, 2, 6, 6, 8, device="cpu", seed=8)
    module = torch.nn.Module()
    module.is_causal = True
    out, _ = fn(module, q, k, v, None)                          # (B, L, Hq, Dv)
    ref = flashmaps.reference.attention(q, k, v, "relu2", causal=True, enable_gqa=True)
    assert rel_err(out.transpose(1, 2), ref) < 1e-5
