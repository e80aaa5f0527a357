"""The benchmark harness: FLOP model vs a hand count, providers, measurement and failure handling."""

import json
import math
import os

import pytest
import torch

from flashmaps import reference
from flashmaps.bench import flops, harness, providers, worker


# ----------------------------------------------------------------------------------------------------
# the FLOP model


def _hand_count_fwd(L, S, Dqk, Dv, causal):
    """Multiply-adds of a naive forward loop: for each allowed (i, j), Dqk for s_ij and Dv for p_ij v_j."""
    macs = 0
    for i in range(L):
        for j in range(S):
            if causal == "upper_left" and j > i:
                continue
            if causal == "lower_right" and j > i + S - L:
                continue
            macs += Dqk + Dv
    return 2 * macs


@pytest.mark.parametrize("causal", [None, "upper_left", "lower_right"])
@pytest.mark.parametrize("L,S", [(1, 1), (1, 7), (3, 3), (2, 5), (5, 3), (8, 8), (9, 4), (4, 9)])
def test_flops_fwd_equals_hand_count(L, S, causal):
    assert flops.attention_flops("fwd", 1, 1, L, S, 3, 5, causal) == _hand_count_fwd(L, S, 3, 5, causal)


def test_flops_literal_hand_counts():
    # L = S = 2, D = 1, full: Q K^T is 4 multiply-adds, P V is 4: 16 FLOPs
    assert flops.attention_flops("fwd", 1, 1, 2, 2, 1) == 16
    # L = S = 3 upper_left: rows keep 1, 2, 3 keys = 6 pairs; D = Dv = 2: 2 * 6 * (2 + 2) = 48
    assert flops.allowed_pairs(3, 3, "upper_left") == 6
    assert flops.attention_flops("fwd", 1, 1, 3, 3, 2, 2, "upper_left") == 48
    # L = 2, S = 5 lower_right (j <= i + 3): rows keep 4 and 5 keys
    assert flops.allowed_pairs(2, 5, "lower_right") == 9
    # L = 5, S = 3: upper_left rows keep 1, 2, 3, 3, 3; lower_right (j <= i - 2) rows keep 0, 0, 1, 2, 3
    assert flops.allowed_pairs(5, 3, "upper_left") == 12
    assert flops.allowed_pairs(5, 3, "lower_right") == 6
    # batch and heads multiply; backward = recompute QK^T (Dqk) + dO V^T (Dv) + P^T dO (Dv) + dS K (Dqk)
    # + dS^T Q (Dqk) = 2 * pairs * (3 Dqk + 2 Dv): B=2, H=3, L=S=4 full, Dqk=2, Dv=4 -> 2 * 96 * 14
    assert flops.attention_flops("bwd", 2, 3, 4, 4, 2, 4) == 2 * 96 * 14
    assert flops.attention_flops("fwd+bwd", 2, 3, 4, 4, 2, 4) == 2 * 96 * 14 + 2 * 96 * 6
    # Dqk == Dv: backward is 2.5 x forward (the FlashAttention convention)
    assert flops.attention_flops("bwd", 1, 8, 128, 128, 64) == 2.5 * flops.attention_flops("fwd", 1, 8, 128, 128, 64)
    # decode: one query row whatever L says
    assert flops.attention_flops("decode", 1, 1, 4096, 10, 4) == 2 * 10 * 8


def test_flops_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        flops.attention_flops("forward", 1, 1, 2, 2, 2)
    with pytest.raises(ValueError, match="causal"):
        flops.allowed_pairs(2, 2, "diagonal")


# ----------------------------------------------------------------------------------------------------
# providers


def test_cpu_provider_list_has_no_triton_and_no_flex():
    names = [p.name for p in providers.providers_for("cpu")]
    assert len(names) == len(set(names))
    assert not any("triton" in n for n in names)
    assert "flex" not in names
    assert {"sdpa", "sdpa-math", "entmax15-dense", "flashmaps-entmax15-torch", "flashmaps-topk:64-torch"} <= set(names)


def test_cuda_provider_list_has_every_backend():
    names = {p.name for p in providers.providers_for("cuda", ["softmax"])}
    assert {"flashmaps-softmax-triton", "flashmaps-softmax-torch", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn",
            "sdpa-math", "flex", "fla-based", "adasplash"} <= names


def test_get_provider_round_trips_every_name():
    for p in providers.providers_for("cuda") + providers.providers_for("cpu"):
        assert providers.get_provider(p.name).name == p.name
    with pytest.raises(ValueError, match="unknown provider"):
        providers.get_provider("flashattention-9")
    with pytest.raises(ValueError):
        providers.get_provider("flashmaps-nosuchmap-torch")


def test_cuda_only_providers_are_unavailable_on_cpu_with_a_reason():
    for name in ("flashmaps-softmax-triton", "flex", "sdpa-flash", "fla-based", "adasplash"):
        reason = providers.get_provider(name).unavailable("cpu")
        assert reason and "CUDA" in reason, (name, reason)
    assert providers.get_provider("sdpa").unavailable("cpu") is None


@pytest.mark.parametrize("name,causal", [("sdpa", "lower_right"), ("sdpa-math", "upper_left"),
                                         ("entmax15-dense", "lower_right"), ("entmax15-dense", None)])
def test_baseline_providers_match_the_reference(name, causal):
    prov = providers.get_provider(name)
    torch.manual_seed(0)
    q = torch.randn(1, 4, 5, 8)  # GQA 4 -> 2 heads, L != S
    k, v = torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    out = prov.make("cpu")(q, k, v, causal)
    ref = reference.attention(q, k, v, prov.normalizer, causal=causal or False, enable_gqa=True)
    assert (out.double() - ref).norm() / ref.norm() < 1e-5


# ----------------------------------------------------------------------------------------------------
# measurement in the worker (run in-process here)


def _job(**kw):
    job = dict(provider="sdpa", mode="fwd", B=1, Hq=2, Hkv=2, L=16, S=16, Dqk=8, Dv=8, causal=None,
               dtype="float32", device="cpu", min_run_time=0.01)
    job.update(kw)
    return job


def test_cpu_extra_peak_sees_a_known_allocation():
    n = 25_000_000  # 100 MB of float32
    extra, sec = worker.cpu_extra_peak(lambda: torch.ones(n).sum())
    assert 0.9 * 4 * n < extra < 1.3 * 4 * n and sec > 0
    again, _ = worker.cpu_extra_peak(lambda: torch.ones(n).sum())  # freed memory is not counted twice
    assert 0.9 * 4 * n < again < 1.3 * 4 * n


def test_time_cpu_reports_quantiles_and_at_least_min_runs():
    t = worker.time_cpu(lambda: torch.ones(1000).sum(), min_run_time=0.01, min_runs=3)
    assert 0 < t["time_q20_ms"] <= t["time_ms"] <= t["time_q80_ms"]
    assert t["n_runs"] >= 3


@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd", "decode"])
def test_run_job_measures_every_mode(mode):
    row = worker.run_job(_job(mode=mode, causal=None if mode == "decode" else "upper_left"))
    assert row["status"] == "ok", row.get("message")
    assert row["time_ms"] > 0 and row["tflops"] > 0 and row["peak_mem_bytes"] >= 0
    L = 1 if mode == "decode" else 16
    assert row["L"] == L
    assert row["flops"] == flops.attention_flops(mode, 1, 2, L, 16, 8, 8, row["causal"])


def test_run_job_checks_error_and_sparsity_from_the_measured_path():
    row = worker.run_job(_job(provider="entmax15-dense", L=24, S=40, causal="lower_right", check=True,
                              max_ref_elems=1 << 20))
    assert row["status"] == "ok"
    assert row["err"] < 1e-5
    q, k, v = worker.make_inputs(row)
    _, p = reference.attention(q, k, v, "entmax15", causal="lower_right", return_weights=True)
    allowed = torch.arange(40)[None, :] <= torch.arange(24)[:, None] + 16
    expected = ((p[0, 0] == 0) & allowed).sum().item() / allowed.sum().item()
    assert 0 < expected < 1
    assert row["sparsity"] == pytest.approx(expected, abs=1e-9)


class _Fake:
    """A provider whose function raises ``exc`` (patched into the worker's registry lookup)."""

    def __init__(self, exc=None, probe=None):
        self.exc, self._probe = exc, probe

    def __call__(self, name):
        exc, probe = self.exc, self._probe

        def make(device):
            def fn(q, k, v, causal):
                raise exc
            return fn

        return providers.Provider(name, "fake", "softmax", make, lambda device: probe)


@pytest.mark.parametrize("exc,status", [
    (NotImplementedError("no backward yet"), "unsupported"),
    (RuntimeError("No available kernel. Aborting execution."), "unsupported"),
    (torch.cuda.OutOfMemoryError("CUDA out of memory"), "oom"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"), "oom"),
    (ValueError("boom"), "error"),
], ids=["notimplemented", "no-kernel", "cuda-oom", "cpu-oom", "error"])
def test_failures_are_data_points(monkeypatch, exc, status):
    monkeypatch.setattr(worker, "get_provider", _Fake(exc))
    row = worker.run_job(_job(provider="fake"))
    assert row["status"] == status
    assert type(exc).__name__ in row["message"]
    assert row["time_ms"] is None


def test_unavailable_provider_is_reported_not_raised(monkeypatch):
    monkeypatch.setattr(worker, "get_provider", _Fake(probe="fakelib is not installed"))
    row = worker.run_job(_job(provider="fake"))
    assert row["status"] == "unavailable" and "not installed" in row["message"]
    row = worker.run_job(_job(provider="adasplash"))  # the real one: CUDA only
    assert row["status"] == "unavailable"


# ----------------------------------------------------------------------------------------------------
# the harness (worker process, sweeps, results files)


def test_sweep_orders_lengths_and_keeps_decode_non_causal():
    provs = [providers.get_provider("sdpa")]
    jobs = harness.sweep(device="cpu", providers=provs, seqs=[512, 128, 256], modes=["fwd", "decode"],
                         batches=["auto"], causals=[None, "upper_left"], tokens=1024)
    fwd = [(j["S"], j["B"], j["causal"]) for j in jobs if j["mode"] == "fwd"]
    assert fwd == [(128, 8, None), (256, 4, None), (512, 2, None),
                   (128, 8, "upper_left"), (256, 4, "upper_left"), (512, 2, "upper_left")]
    assert {j["causal"] for j in jobs if j["mode"] == "decode"} == {None}


def test_skip_rules():
    job = _job(S=4096, L=4096)
    key = harness._group_key(job)
    assert harness._skip_reason(job, {}, 10) is None
    assert "oom" in harness._skip_reason(job, {key: dict(job, S=2048, status="oom")}, 10)
    # 2048 -> 4096 is 4x the work: 3 s becomes ~12 s
    assert "12 s" in harness._skip_reason(job, {key: dict(job, S=2048, status="ok", time_ms=3000)}, 10)
    assert harness._skip_reason(job, {key: dict(job, S=2048, status="ok", time_ms=2000)}, 10) is None


def test_run_jobs_records_oom_and_skips_larger_cases(tmp_path):
    # a 1.5 GB data limit on the worker: 32k x 32k float32 scores (4 GB) cannot be allocated
    jobs = [_job(provider="entmax15-dense", Hq=1, Hkv=1, L=s, S=s) for s in (32768, 65536)]
    jobs.insert(0, _job(provider="adasplash"))
    rows = harness.run_jobs(jobs, log_path=tmp_path / "log", partial_path=tmp_path / "p.jsonl",
                            mem_limit=1_500_000_000, progress=False)
    assert [r["status"] for r in rows] == ["unavailable", "oom", "skipped"]
    assert "S=32768" in rows[2]["message"]
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 3
    assert "oom" in (tmp_path / "log").read_text()


def test_run_jobs_abandons_a_case_past_its_timeout(tmp_path):
    # 0.2 s cannot even cover the worker's start: the case times out, the worker is killed, the larger
    # case of the same group is skipped, and a fresh worker is started for the next group
    jobs = [_job(S=16, L=16), _job(S=32, L=32), _job(provider="sdpa-math")]
    rows = harness.run_jobs(jobs, timeout=0.2, progress=False)
    assert [r["status"] for r in rows] == ["timeout", "skipped", "timeout"]
    assert "timeout" in rows[1]["message"]


def test_write_results_tags_every_row(tmp_path):
    meta = harness.tags("cpu")
    assert {"device", "git_sha", "date", "version_torch", "version_flashmaps"} <= set(meta)
    rows = [dict(_job(), status="ok", time_ms=1.5), dict(_job(provider="x"), status="unavailable", message="m")]
    jpath, cpath = harness.write_results(rows, tmp_path, "bench", meta)
    data = json.loads(jpath.read_text())
    assert data["meta"] == meta and len(data["rows"]) == 2
    assert all(r["device"] == meta["device"] and r["git_sha"] == meta["git_sha"] for r in data["rows"])
    lines = cpath.read_text().splitlines()
    assert len(lines) == 3 and "version_torch" in lines[0] and "date" in lines[0]


def test_parse_seq():
    assert harness.parse_seq("4k") == 4096 and harness.parse_seq("128K") == 131072 and harness.parse_seq(300) == 300
    for bad in ("abc", "0", "-4"):
        with pytest.raises(ValueError):
            harness.parse_seq(bad)


def test_format_table():
    text = harness.format_table([{"a": 1.23456, "b": None}, {"a": "long text", "b": 2}], [("A", "a"), ("B", "b")])
    lines = text.splitlines()
    assert lines[0].split() == ["A", "B"] and lines[2].split() == ["1.23", "-"] and len(lines) == 4
    assert math.isclose(float(lines[2].split()[0]), 1.23)


# ----------------------------------------------------------------------------------------------------
# provider names with pinned configs, knobs and trees


@pytest.mark.parametrize("name,config,knobs", [
    ("flashmaps-softmax-triton[fwd=128,128,8,3]",
     {"fwd": {"BM": 128, "BN": 128, "num_warps": 8, "num_stages": 3}}, {}),
    ("flashmaps-entmax15-triton[bwd=64,64,4,2]",
     {"dkdv": {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 2},
      "dq": {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 2}}, {}),
    ("flashmaps-taylor-triton[fwd=16,16;dkdv=64,32,8,2;dq=128,64,8,2]",
     {"fwd": {"BM": 16, "BN": 16}, "dkdv": {"BM": 64, "BN": 32, "num_warps": 8, "num_stages": 2},
      "dq": {"BM": 128, "BN": 64, "num_warps": 8, "num_stages": 2}}, {}),
    ("flashmaps-topk:64-triton[fwd=64,64,4,3;flashmaps.kernels.topk.COLLECT=True]",
     {"fwd": {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 3}}, {"flashmaps.kernels.topk.COLLECT": True}),
    ("sdpa[torch.backends.cuda.matmul.allow_tf32=False;x.y=fast]", None,
     {"torch.backends.cuda.matmul.allow_tf32": False, "x.y": "fast"}),
])
def test_provider_names_with_options_round_trip(name, config, knobs):
    prov = providers.get_provider(name)
    assert prov.name == name and prov.config == config and prov.knobs == knobs
    twin = providers.get_provider(name + "@base")
    assert twin.name == name + "@base" and twin.config == config and providers.split_name(twin.name)[3] == "base"
    base = providers.split_name(name)[0]
    assert providers.with_options(providers.get_provider(base), config, knobs).name == name
    assert prov.normalizer == providers.get_provider(base).normalizer


def test_provider_options_are_written_canonically():
    a = providers.get_provider("flashmaps-softmax-triton[flashmaps.kernels.softmax.X=2; dq=64,64,4,2 ;fwd=64,64,4,3]")
    assert a.name == "flashmaps-softmax-triton[fwd=64,64,4,3;dq=64,64,4,2;flashmaps.kernels.softmax.X=2]"
    b = providers.with_options(providers.with_options(providers.get_provider("flashmaps-softmax-triton"),
                                                      {"fwd": {"BM": 16, "BN": 16}}), knobs={"a.b": 1}, tree="base")
    assert b.name == "flashmaps-softmax-triton[fwd=16,16;a.b=1]@base"


@pytest.mark.parametrize("name,msg", [
    ("flashmaps-softmax-torch[fwd=64,64,4,3]", "pinned configs are for"),
    ("sdpa[bwd=64,64,4,2]", "pinned configs are for"),
    ("flashmaps-softmax-triton[fwd=64,64,4]", "BM,BN,num_warps,num_stages"),
    ("flashmaps-softmax-triton[speed=11]", "dotted attribute path"),
    ("flashmaps-softmax-triton[COLLECT]", "key=value"),
    ("flashmaps-softmax-triton[fwd=64,64", "malformed"),
])
def test_bad_provider_options_say_what_to_write(name, msg):
    with pytest.raises(ValueError, match=msg):
        providers.get_provider(name)


def test_default_normalizers_come_from_the_registry():
    from flashmaps.normalizers import defaults

    specs = [n.spec for n in defaults()]
    assert list(providers.default_normalizers()) == specs
    names = {p.name for p in providers.providers_for("cpu")}
    assert {f"flashmaps-{s}-torch" for s in specs} <= names


def test_triton_on_cpu_only_for_interpreted_smoke_runs(monkeypatch):
    prov = providers.get_provider("flashmaps-softmax-triton[fwd=16,16]")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("FLASHMAPS_BENCH_INTERPRET", raising=False)
    assert "CUDA" in prov.unavailable("cpu")
    monkeypatch.setenv("FLASHMAPS_BENCH_INTERPRET", "1")
    assert prov.unavailable("cpu") is None


def test_pinned_config_provider_matches_the_reference_forward_and_backward():
    """The launchers with pinned configs, wrapped for autograd (runs under the interpreter on the CPU)."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    prov = providers.get_provider("flashmaps-entmax15-triton[fwd=16,16;bwd=16,16]")
    fn = prov.make(dev)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g).to(dev).requires_grad_(True)
               for shape in [(1, 4, 24, 16), (1, 2, 40, 16), (1, 2, 40, 16)])  # GQA, L != S
    out = fn(q, k, v, "lower_right")
    ref = reference.attention(q, k, v, "entmax15", causal="lower_right", enable_gqa=True)
    assert (out.double() - ref).norm() / ref.norm() < 1e-5
    dout = torch.randn(out.shape, generator=g).to(dev)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (q, k, v), dout.double())
    for a, b in zip(got, want):
        assert (a.double() - b).norm() / b.norm() < 1e-4


def test_flex_provider_raises_the_recompile_limit(monkeypatch):
    import torch._dynamo

    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    # set and restored by hand: monkeypatch's undo deletes the attribute from torch's config module (its
    # entries are not in the module __dict__), which broke every later torch.compile in the process
    cfg = torch._dynamo.config
    old = {n: getattr(cfg, n) for n in (name, "accumulated_recompile_limit", "accumulated_cache_size_limit")
           if hasattr(cfg, n)}
    try:
        setattr(cfg, name, 8)
        providers.get_provider("flex").make("cpu")  # compiles lazily: nothing runs here
        assert getattr(cfg, name) >= providers.FLEX_RECOMPILE_LIMIT
    finally:
        for n, value in old.items():
            setattr(cfg, n, value)


# ----------------------------------------------------------------------------------------------------
# knobs in the worker


def test_knobs_are_set_for_the_block_and_restored():
    import flashmaps.kernels.topk as topk

    before = topk.COLLECT
    with worker.knobs_applied({"flashmaps.kernels.topk.COLLECT": not before, "flashmaps.kernels.topk.KMAX": 7}):
        assert topk.COLLECT is (not before) and topk.KMAX == 7
    assert topk.COLLECT is before and topk.KMAX != 7
    with pytest.raises(RuntimeError, match="inside"):
        with worker.knobs_applied({"flashmaps.kernels.topk.COLLECT": not before}):
            raise RuntimeError("inside")
    assert topk.COLLECT is before
    # a knob whose target does not exist fails, and the ones set before it are restored
    with pytest.raises(AttributeError, match="NO_SUCH"):
        with worker.knobs_applied({"flashmaps.kernels.topk.COLLECT": not before,
                                   "flashmaps.kernels.topk.NO_SUCH": 1}):
            pass
    assert topk.COLLECT is before
    with pytest.raises(ImportError):
        with worker.knobs_applied({"no_such_module_xyz.attr": 1}):
            pass


def test_run_job_applies_knobs_for_the_whole_measurement(monkeypatch):
    import flashmaps.kernels.topk as topk

    seen = []

    def fake_provider(name):
        base = providers.get_provider("sdpa")

        def make(device):
            inner = base.make(device)
            seen.append(("make", topk.KMAX))

            def fn(q, k, v, causal):
                seen.append(("call", topk.KMAX))
                return inner(q, k, v, causal)
            return fn

        return providers.dataclasses.replace(base, name=name, make=make, knobs={"flashmaps.kernels.topk.KMAX": 3})

    monkeypatch.setattr(worker, "get_provider", fake_provider)
    row = worker.run_job(_job(provider="sdpa[flashmaps.kernels.topk.KMAX=3]", check=True))
    assert row["status"] == "ok" and row["knobs"] == {"flashmaps.kernels.topk.KMAX": 3}
    assert len(seen) >= 4 and all(v == 3 for _, v in seen)
    assert topk.KMAX != 3
    monkeypatch.undo()
    row = worker.run_job(_job(provider="sdpa[flashmaps.kernels.topk.NO_SUCH_KNOB=3]"))
    assert row["status"] == "error" and "NO_SUCH_KNOB" in row["message"]


def test_run_job_checks_sampled_rows():
    row = worker.run_job(_job(provider="entmax15-dense", L=40, S=40, causal="upper_left", check_rows=6))
    assert row["status"] == "ok" and row["err"] < 1e-5 and "6 sampled rows" in row["err_note"]
    warm = worker.run_job(_job(warm_only=True))
    assert warm["status"] == "ok" and warm["time_ms"] is None and "warm-up" in warm["message"]


# ----------------------------------------------------------------------------------------------------
# trees: a second checkout next to this one


@pytest.fixture(scope="module")
def base_tree(tmp_path_factory):
    """A copy of this checkout's package (flashmaps/, kernels/, pyproject.toml) with a marker attribute
    that only its kernels have: a knob on it works in that tree's worker and fails in this tree's."""
    import shutil

    root = harness._package_root()
    dst = tmp_path_factory.mktemp("base") / "tree"
    ignore = shutil.ignore_patterns("__pycache__")
    for folder in ("flashmaps", "kernels"):
        shutil.copytree(root / folder, dst / folder, ignore=ignore)
    shutil.copy(root / "pyproject.toml", dst / "pyproject.toml")
    with open(dst / "kernels" / "softmax.py", "a") as f:
        f.write("\nBENCH_TEST_MARK = 0  # only in the baseline copy (tests/test_bench.py)\n")
    return dst


def test_package_dirs_of_a_checkout(base_tree, monkeypatch):
    from flashmaps.bench import trees

    dirs = trees.package_dirs(base_tree)
    assert dirs["flashmaps"] == str(base_tree / "flashmaps") and dirs["flashmaps.kernels"] == str(base_tree / "kernels")
    assert trees.baseline_mapping(base_tree)["flashmaps.bench"] == trees.loaded_mapping()["flashmaps.bench"]
    monkeypatch.setitem(__import__("sys").modules, "tomllib", None)  # Python 3.10: the table read by hand
    assert trees.package_dirs(base_tree) == dirs
    with pytest.raises(ValueError, match="not a checkout"):
        trees.package_dirs(base_tree / "kernels")


def test_add_baseline_interleaves_twins_case_by_case(base_tree):
    provs = [providers.get_provider(n) for n in ("flashmaps-softmax-torch", "sdpa")]
    jobs = harness.order_by_case(harness.sweep(device="cpu", providers=provs, seqs=[16, 32], modes=["fwd"]))
    assert [(j["provider"], j["S"]) for j in jobs] == [("flashmaps-softmax-torch", 16), ("sdpa", 16),
                                                      ("flashmaps-softmax-torch", 32), ("sdpa", 32)]
    out = harness.add_baseline(jobs, base_tree, sha="abc123")
    assert [(j["provider"], j["S"]) for j in out] == [
        ("flashmaps-softmax-torch", 16), ("flashmaps-softmax-torch@base", 16), ("sdpa", 16),
        ("flashmaps-softmax-torch@base", 32), ("flashmaps-softmax-torch", 32), ("sdpa", 32)]
    twins = [j for j in out if j["provider"].endswith("@base")]
    assert all(j["tree"] == "abc123" and j["tree_root"] == str(base_tree.resolve()) for j in twins)
    assert all(j["tree"] == harness.git_sha() and "tree_root" not in j for j in out if j not in twins)
    with pytest.raises(ValueError, match="not a checkout"):
        harness.add_baseline(jobs, base_tree / "kernels")


def test_baseline_twins_run_from_the_other_tree(base_tree):
    mark = "flashmaps-softmax-torch[flashmaps.kernels.softmax.BENCH_TEST_MARK=1]"
    jobs = harness.add_baseline([_job(provider=mark), _job(provider="flashmaps-softmax-torch")], base_tree,
                                sha="basesha")
    rows = {r["provider"]: r for r in harness.run_jobs(jobs, progress=False)}
    assert set(rows) == {mark, mark + "@base", "flashmaps-softmax-torch", "flashmaps-softmax-torch@base"}
    # the marker exists only in the copy's kernels: the twin's worker imported them, this tree's did not
    assert rows[mark + "@base"]["status"] == "ok", rows[mark + "@base"]["message"]
    assert rows[mark]["status"] == "error" and "BENCH_TEST_MARK" in rows[mark]["message"]
    for name in ("flashmaps-softmax-torch", "flashmaps-softmax-torch@base"):
        assert rows[name]["status"] == "ok"
    assert rows["flashmaps-softmax-torch@base"]["source"] == str(base_tree.resolve())
    assert rows["flashmaps-softmax-torch"]["source"] == str(harness._package_root())
    assert rows["flashmaps-softmax-torch@base"]["tree"] == "basesha"


def test_run_jobs_skips_what_the_budget_leaves_no_time_for():
    import time

    rows = harness.run_jobs([_job(), _job(provider="sdpa-math")], deadline=time.monotonic() - 1, progress=False)
    assert [r["status"] for r in rows] == ["skipped", "skipped"] and "budget" in rows[0]["message"]


def test_prewarm_jobs_compile_each_kernel_setup_once_at_a_small_length():
    jobs = harness.sweep(device="cuda", providers=[providers.get_provider(n) for n in (
        "flashmaps-softmax-triton", "flashmaps-softmax-triton[fwd=64,64,4,3]", "flashmaps-softmax-torch", "sdpa")],
        seqs=[1024, 4096], modes=["fwd", "fwd+bwd"], batches=["auto"], tokens=8192)
    warm = harness.prewarm_jobs(jobs)
    assert {(j["provider"], j["mode"]) for j in warm} == {
        (p, m) for p in ("flashmaps-softmax-triton", "flashmaps-softmax-triton[fwd=64,64,4,3]")
        for m in ("fwd", "fwd+bwd")}
    assert all(j["warm_only"] and j["B"] == 1 and j["L"] == j["S"] == 512 for j in warm)


def test_write_results_keeps_dicts_in_the_csv(tmp_path):
    row = dict(_job(provider="flashmaps-softmax-triton[fwd=16,16]"), status="ok", config={"fwd": {"BM": 16, "BN": 16}},
               knobs={"a.b": True}, tree="abc")
    jpath, cpath = harness.write_results([row], tmp_path, "x", {"date": "d"}, extra={"run": {"phases": {"bench": 1}}})
    data = json.loads(jpath.read_text())
    assert data["run"]["phases"] == {"bench": 1} and data["rows"][0]["config"] == {"fwd": {"BM": 16, "BN": 16}}
    import csv

    rec = next(csv.DictReader(cpath.open()))
    assert json.loads(rec["config"]) == row["config"] and json.loads(rec["knobs"]) == {"a.b": True} and rec["tree"] == "abc"


# ----------------------------------------------------------------------------------------------------
# suites and gpucheck


def test_suite_h100_goals():
    from flashmaps.bench import suites
    from flashmaps.normalizers import defaults

    jobs = suites.suite_jobs(["h100-goals"], suites.Plan())
    specs = {n.spec for n in defaults()}
    fwd = {j["provider"] for j in jobs if j["mode"] == "fwd"}
    tma = {f"flashmaps-{s}-triton[flashmaps.triton_path.TMA_KV=True]" for s in ("softmax", "entmax15")}
    pers = "flashmaps-softmax-triton[flashmaps.triton_path.PERSISTENT=True]"   # the persistent grid at 1k, 2k
    assert fwd == {f"flashmaps-{s}-triton" for s in specs} | {"sdpa", "sdpa-flash", "sdpa-cudnn", "flex", pers} | tma
    assert {(j["L"], j["B"]) for j in jobs if j["provider"] == pers} == {(1024, 16), (2048, 8)}
    det = "flashmaps-softmax-triton[flashmaps.functional.DETERMINISTIC=True]"   # the two-kernel backward too
    nomask = "flashmaps-entmax15-triton[flashmaps.triton_path.BLOCK_MASK=True]"   # and entmax15 with the mask
    assert {j["provider"] for j in jobs if j["mode"] == "fwd+bwd"} == {f"flashmaps-{s}-triton" for s in specs} | {
        "sdpa", det, nomask}
    assert {j["mode"] for j in jobs} == {"fwd", "fwd+bwd"} and {j["dtype"] for j in jobs} == {"bfloat16"}
    assert {(j["Dqk"], j["Hq"]) for j in jobs} == {(128, 16), (64, 32)}
    assert {j["L"] for j in jobs} == {1024, 2048, 4096, 16384} and all(j["B"] * j["L"] == 16384 for j in jobs)
    n = len(specs)  # fwd: every normalizer, 2 TMA and 4 SDPA/flex providers; fwd+bwd: every normalizer, det, nomask, SDPA
    # (+ the persistent softmax at 1k and 2k, the default softmax at 2k)
    assert {j["causal"] for j in jobs} == {None, "upper_left"} and len(jobs) == 2 * 2 * (3 * ((n + 6) + (n + 3)) + 3)
    assert all(bool(j.get("check")) == (j["mode"] == "fwd" and j["L"] <= 4096) for j in jobs)
    assert all(j["suite"] == "h100-goals" for j in jobs)
    # case by case: the first case's providers all come before the next case
    first = [(j["provider"], j["mode"]) for j in jobs[:n + 7]]
    assert len({(j["mode"], j["L"], j["Dqk"], j["causal"]) for j in jobs[:n + 7]}) == 1 and len(set(first)) == n + 7
    small = suites.suite_jobs(["h100-goals"], suites.Plan(normalizers=("softmax",), dims=(64,), lengths=(2048,),
                                                           modes=("fwd",)))
    assert {(j["provider"], j["Dqk"], j["L"]) for j in small} == {
        (p, 64, 2048) for p in ("flashmaps-softmax-triton", "flashmaps-softmax-triton[flashmaps.triton_path.TMA_KV=True]",
                                "sdpa", "sdpa-flash", "sdpa-cudnn", "flex", pers)}


def test_suite_long_and_tune():
    from flashmaps.bench import suites
    from flashmaps.normalizers import defaults

    long = suites.suite_jobs(["long"], suites.Plan())
    assert {(j["L"], j["S"], j["B"], j["Hq"], j["Dqk"], j["causal"]) for j in long} == {(131072, 131072, 1, 8, 128, None)}
    assert all((j.get("check_rows") == 32) == (j["mode"] == "fwd") for j in long) and len(long) == 2 * len(defaults())

    tune = suites.suite_jobs(["tune"], suites.Plan())
    assert {(j["L"], j["B"]) for j in tune} == {(8192, 2)} and {j["mode"] for j in tune} == {"fwd", "bwd", "fwd+bwd"}
    names = [j["provider"] for j in tune if j["Dqk"] == 128 and j["causal"] is None]
    for c in suites.FWD_CONFIGS[128]:
        assert f"flashmaps-softmax-triton[fwd={','.join(map(str, c))}]" in names
    softmax = providers.get_provider("flashmaps-softmax-triton")
    for c in suites.BWD_CONFIGS["dkdv"][128]:
        config = {"dkdv": suites._cfg(c), "dq": suites._cfg(suites.BWD_CONFIGS["dq"][128][0])}
        assert providers.with_options(softmax, config).name in names
    bwd = [j for j in tune if j["mode"] == "bwd"]
    assert bwd and all(providers.get_provider(j["provider"]).config.keys() == {"dkdv", "dq"} for j in bwd)
    knobbed = {j["provider"] for j in tune if "COLLECT" in j["provider"]}
    sparse = [n for n in defaults() if n.sparse]
    assert len(knobbed) == 2 * len(sparse) and all(
        any(f"flashmaps.kernels.{n.name}.COLLECT" in p for p in knobbed) for n in sparse)
    assert all(j["Dqk"] == 128 for j in tune if "COLLECT" in j["provider"])
    with pytest.raises(ValueError, match="unknown suite"):
        suites.suite_jobs(["nope"], suites.Plan())


def test_suite_decode():
    from flashmaps.bench import suites
    from flashmaps.normalizers import defaults

    jobs = suites.suite_jobs(["decode"], suites.Plan())
    specs = {n.spec for n in defaults()}
    assert {j["provider"] for j in jobs} == {f"flashmaps-{s}-triton" for s in specs} | {
        "sdpa", "sdpa-flash", "flex", "device-copy"}
    assert {(j["B"], j["Hq"], j["Hkv"], j["Dqk"], j["dtype"], j["mode"], j["causal"]) for j in jobs} == {
        (b, 32, 8, 128, "bfloat16", "decode", None) for b in (1, 8)}
    assert {j["S"] for j in jobs} == {4096, 16384, 65536, 131072}
    assert all(bool(j.get("check_rows")) == (j["provider"] != "device-copy") for j in jobs)


def test_smoke_plan_is_tiny_and_covers_every_kind_once():
    from flashmaps.bench import suites
    from flashmaps.normalizers import defaults

    jobs = suites.suite_jobs(list(suites.SUITES), suites.Plan(device="cpu", smoke=True))
    assert all(j["dtype"] == "float32" and j["L"] <= 32 and j["Dqk"] == 16 and j["device"] == "cpu" for j in jobs)
    # one job per provider kind, mode and check: about ten per normalizer (every suite), a few baselines
    assert len({suites._smoke_key(j) for j in jobs}) == len(jobs) < 10 * len(defaults()) + 10
    assert {j["suite"] for j in jobs} == set(suites.SUITES)
    assert {j["mode"] for j in jobs} == {"fwd", "bwd", "fwd+bwd", "decode"}
    assert {j["causal"] for j in jobs} == {None, "upper_left"}
    cfgs = [providers.get_provider(j["provider"]).config for j in jobs if "[" in j["provider"]]
    assert cfgs and all(c == {k: suites.SMOKE_CONFIG for k in c} for c in cfgs if c)
    assert any(j.get("check_rows") for j in jobs) and any(j.get("check") for j in jobs)


def test_gpucheck_cpu_smoke_end_to_end(tmp_path, capsys):
    """Every phase and table of the GPU check on the CPU (interpreter, tiny shapes); two normalizers (one
    sparse) keep it short. No timing value is checked."""
    from flashmaps.bench import gpucheck
    from flashmaps.cli import main

    out = tmp_path / "smoke"
    assert main(["gpu-check", "--cpu-smoke", str(out), "--normalizers", "softmax", "topk:64", "--no-progress"]) == 0
    text = capsys.readouterr().out
    for phase in ("tests", "prewarm", "bench", "total"):
        assert f"phase {phase}:" in text or f"{phase} " in text.split("phases:")[-1]
    assert "h100-goals fwd" in text and "long context" in text and "fastest pinned configs" in text
    assert "fraction of copy" in text
    [jpath] = out.glob("gpu-check-*.json")
    data = json.loads(jpath.read_text())
    meta, rows, run = data["meta"], data["rows"], data["run"]
    assert {"device", "git_sha", "date", "version_torch", "version_triton"} <= set(meta)
    assert run["tests"]["returncode"] == 0 and "skipped" in run["tests"]["summary"]
    assert run["prewarm"]["kernels"] > 0 and not run["prewarm"]["not_ok"]
    assert {r["suite"] for r in rows} == {"h100-goals", "long", "tune", "decode"}
    assert {r["status"] for r in rows} <= {"ok", "unavailable"}
    by = {(r["suite"], r["provider"], r["mode"]): r for r in rows}
    assert by[("h100-goals", "flashmaps-topk:64-triton", "fwd")]["err"] < 1e-5
    assert by[("h100-goals", "flashmaps-topk:64-triton", "fwd")]["sparsity"] is not None
    assert by[("h100-goals", "flashmaps-softmax-triton[flashmaps.triton_path.PERSISTENT=True]", "fwd")]["err"] < 1e-5
    soft = by[("h100-goals", "flashmaps-softmax-triton", "fwd")]    # CUDA-graph time: softmax rows, on CUDA only
    assert soft["cudagraph"] and soft["cudagraph_ms"] is None and "cudagraph" not in by[
        ("h100-goals", "flashmaps-topk:64-triton", "fwd")]
    assert "sampled rows" in by[("long", "flashmaps-softmax-triton", "fwd")]["err_note"]
    assert by[("tune", "flashmaps-softmax-triton[bwd=16,16]", "bwd")]["config"]["dq"] == {"BM": 16, "BN": 16}
    knob = by[("tune", "flashmaps-topk:64-triton[fwd=16,16;flashmaps.kernels.topk.COLLECT=False]", "fwd")]
    assert knob["status"] == "ok" and knob["knobs"] == {"flashmaps.kernels.topk.COLLECT": False}
    dec = [r for r in rows if r["suite"] == "decode" and r["status"] == "ok"]
    assert {r["provider"] for r in dec} >= {"flashmaps-softmax-triton", "sdpa", "device-copy"}
    for r in dec:     # K/V bytes read per second (the copy: read and written)
        nbytes = r["B"] * r["Hkv"] * r["S"] * (r["Dqk"] + r["Dv"]) * 4 * (2 if r["provider"] == "device-copy" else 1)
        assert r["L"] == 1 and r["gbps"] == pytest.approx(nbytes / (r["time_ms"] * 1e-3) / 1e9)
    assert all(r["tree"] == meta["git_sha"] and r["source"] == str(harness._package_root())
               for r in rows if r["status"] == "ok")
    assert (out / f"{jpath.stem}-pytest.log").is_file() and (out / f"{jpath.stem}-bench.log").is_file()
    assert not list(out.glob("*.partial.jsonl"))

    assert main(["gpu-check", "--table", str(jpath)]) == 0
    md = capsys.readouterr().out
    assert "| D | causal | L |" in md and "softmax vs best SDPA" in md
    assert main(["gpu-check", "--plot", str(jpath), str(tmp_path / "png")]) == 0
    assert list((tmp_path / "png").glob("bench-*.png"))
    assert gpucheck.load(jpath)[1] == rows


def test_gpucheck_baseline_tree_side_by_side(tmp_path, capsys, base_tree):
    from flashmaps.cli import main

    out = tmp_path / "ab"
    args = ["gpu-check", "--cpu-smoke", str(out), "--no-tests", "--prewarm", "0", "--suites", "h100-goals",
            "--providers", "flashmaps-softmax-triton", "--baseline-tree", str(base_tree), "--baseline-sha", "old",
            "--no-progress"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "now/base" in text and "geomean now/base" in text
    [jpath] = out.glob("gpu-check-*.json")
    data = json.loads(jpath.read_text())
    rows = data["rows"]
    assert [r["provider"].endswith("@base") for r in rows] == [False, True, True, False]  # alternating
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"} and {r["status"] for r in rows} == {"ok"}
    assert {r["source"] for r in rows if r["provider"].endswith("@base")} == {str(base_tree.resolve())}
    assert {r["tree"] for r in rows if r["provider"].endswith("@base")} == {"old"}
    assert data["run"]["baseline_tree"] == {"path": str(base_tree.resolve()), "sha": "old"}


def test_gpucheck_reads_results_of_the_former_script():
    from flashmaps.bench import gpucheck

    path = harness._package_root() / "bench/results/cuda-nvidia-h100-80gb-hbm3/gpu-check-20261122T192946Z.json"
    if not path.is_file():
        pytest.skip("no former results file in this checkout")
    meta, rows = gpucheck.load(path)
    assert meta["git_sha"] and rows and {r["suite"] for r in rows} == {"h100-goals", "long"}
    md = gpucheck.markdown(rows)
    assert "h100-goals fwd" in md and "long context" in md and "softmax vs best SDPA" in md


def test_default_results_go_to_the_users_folder_not_the_checkout(tmp_path, monkeypatch):
    """A user's run never writes into the repository's committed bench/results/ unless --out says so."""
    monkeypatch.delenv("FLASHMAPS_RESULTS", raising=False)
    monkeypatch.chdir(tmp_path)
    out = harness.default_out_dir("cpu")
    assert out.parent == tmp_path / "flashmaps-results"
    monkeypatch.setenv("FLASHMAPS_RESULTS", str(tmp_path / "mine"))
    assert harness.default_out_dir("cpu").parent == tmp_path / "mine"
    assert harness._package_root() / "bench" / "results" not in out.parents


def test_trust_warnings_flag_noise_load_and_contradictions():
    """Benchmarks say how much to trust them: a wide 20-80 % spread, a loaded CPU and fwd+bwd faster than
    fwd each give a warning; a quiet, consistent run gives none."""
    case = dict(provider="p", B=1, Hq=8, Hkv=8, L=512, S=512, Dqk=64, Dv=64, causal=None, dtype="float32",
                status="ok")
    fwd = dict(case, mode="fwd", time_ms=10.0, time_q20_ms=9.8, time_q80_ms=10.3)
    both = dict(case, mode="fwd+bwd", time_ms=30.0, time_q20_ms=29.0, time_q80_ms=31.0)
    quiet = {"load_avg_1min": 0.0, "load_avg_1min_end": 2.0 * (os.cpu_count() or 1)}   # the end counts the run
    assert harness.trust_warnings([fwd, both], quiet) == []
    assert harness.fmt_spread(fwd) == "±2%"
    noisy = dict(fwd, time_q20_ms=5.0, time_q80_ms=20.0)
    assert any(w.startswith("noisy: p fwd S=512") for w in harness.trust_warnings([noisy, both], quiet))
    loaded = {"load_avg_1min": 4.0 * (os.cpu_count() or 1), "load_avg_1min_end": 0.0}
    assert any("loaded" in w for w in harness.trust_warnings([fwd, both], loaded))
    fast_both = dict(both, time_ms=8.0, time_q20_ms=7.9, time_q80_ms=8.1)
    assert any(w.startswith("contradiction: p S=512") for w in harness.trust_warnings([fwd, fast_both], quiet))


def test_host_bench_end_to_end(tmp_path):
    """``python -m flashmaps.bench.host`` (issue 17) in a fresh process without TRITON_INTERPRET (it needs the
    compiled-mode kernels, whose launches it stubs): one round of one call per case, the results file tagged."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "host.json"
    res = subprocess.run([sys.executable, "-m", "flashmaps.bench.host", "--rounds", "2", "--calls", "1",
                          "--normalizers", "softmax", "--out", str(out)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert {"device", "git_sha", "date", "version_triton", "method"} <= set(data["meta"])
    rows = {r["case"]: r for r in data["rows"]}
    assert set(rows) == {"softmax fwd", "softmax fwd-grad", "softmax fwd+bwd", "softmax sdpa"}
    assert all(r["us_min"] > 0 and r["aten_ops"] > 0 and r["rounds"] == 2 for r in rows.values())
    assert rows["softmax fwd+bwd"]["aten_ops"] > rows["softmax fwd"]["aten_ops"]
