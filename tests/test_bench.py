"""The benchmark harness: FLOP model vs a hand count, providers, measurement and failure handling."""

import json
import math

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
