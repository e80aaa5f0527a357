"""The ``flashmaps`` command end to end at tiny sizes: tables printed, JSON parses, PNG written."""

import json
import re
import subprocess
import sys

import pytest

from flashmaps.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--heads", "2", "--head-dim", "16", "--min-run-time", "0.01", "--threads", "1", "--no-progress"]


def _is_png(path):
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "flashmaps-entmax15-torch" in out and "sdpa" in out
    assert "unavailable" in out  # fla-based / adasplash: reported, not fatal


def test_compare_end_to_end(tmp_path, capsys):
    out_dir = tmp_path / "cmp"
    args = ["compare", "--out", str(out_dir), "--seq", "48", "--kv-heads", "1", "--causal", "lower_right", *TINY]
    assert main(args) == 0
    text = capsys.readouterr().out
    for name in ("flashmaps-softmax-torch", "flashmaps-taylor-torch", "flashmaps-entmax15-torch",
                 "flashmaps-topk:64-torch", "sdpa", "entmax15-dense", "rel err", "time/SDPA", "zeros"):
        assert name in text
    data = json.loads((out_dir / "compare.json").read_text())
    rows = {r["provider"]: r for r in data["rows"]}
    assert all(r["status"] == "ok" for r in rows.values()), [(r["provider"], r["message"]) for r in rows.values()]
    for r in rows.values():
        assert r["err"] < 1e-5, r["provider"]
        assert r["device"] == data["meta"]["device"] and r["git_sha"] and r["date"] and r["version_torch"]
    assert rows["sdpa"]["time_vs_sdpa"] == 1.0
    assert 0 < rows["flashmaps-entmax15-torch"]["sparsity"] < 1
    assert rows["flashmaps-entmax15-torch"]["sparsity"] == rows["entmax15-dense"]["sparsity"]
    assert rows["flashmaps-topk:64-torch"]["sparsity"] is not None
    assert rows["flashmaps-softmax-torch"]["sparsity"] is None
    assert (out_dir / "compare.csv").read_text().count("\n") == len(rows) + 1
    assert _is_png(out_dir / "compare-fwd.png")


def test_bench_end_to_end_with_an_unavailable_provider(tmp_path, capsys):
    out_dir = tmp_path / "bench"
    args = ["bench", "--out", str(out_dir), "--seq", "32,64", "--modes", "fwd", "decode", "fwd+bwd",
            "--normalizers", "entmax15", "--providers", "flashmaps-*", "sdpa", "adasplash", *TINY]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "TFLOP/s" in text and "adasplash" in text and "unavailable" in text
    data = json.loads((out_dir / "bench.json").read_text())
    by = {(r["provider"], r.get("mode"), r.get("S")): r for r in data["rows"]}
    assert by[("adasplash", None, None)]["status"] == "unavailable"
    for prov in ("flashmaps-entmax15-torch", "sdpa"):
        for mode in ("fwd", "decode", "fwd+bwd"):
            for s in (32, 64):
                r = by[(prov, mode, s)]
                assert r["status"] == "ok" and r["time_ms"] > 0 and r["tflops"] > 0, r
    assert not (out_dir / "bench.partial.jsonl").exists()
    pngs = sorted(p.name for p in out_dir.glob("*.png"))
    assert pngs == ["bench-decode-float32-full-h2-kv2-d16.png", "bench-fwd-bwd-float32-full-h2-kv2-d16.png",
                    "bench-fwd-float32-full-h2-kv2-d16.png"]
    assert all(_is_png(out_dir / p) for p in pngs)

    # the separate plotting step redraws from the JSON
    replot = tmp_path / "replot"
    assert main(["plot", str(out_dir / "bench.json"), "--out", str(replot)]) == 0
    assert sorted(p.name for p in replot.glob("*.png")) == pngs


@pytest.mark.parametrize("args,msg", [
    (["bench", "--seq", "abc"], "--seq"),
    (["bench", "--seq", "0"], "--seq"),
    (["bench", "--normalizers", "softmaxx"], "unknown normalizer"),
    (["bench", "--providers", "nope-*"], "matches none"),
    (["bench", "--modes", "sideways"], "unknown mode"),
    (["bench", "--heads", "x"], "--heads"),
    (["bench", "--max-call-s", "-1"], "--max-call-s"),
    (["bench", "--causal", "maybe"], "--causal"),
    (["compare", "--heads", "6", "--kv-heads", "4"], "multiple"),
    (["compare", "--modes", "decode"], "compare runs"),
    (["compare", "--seq", "3x"], "--seq: bad sequence length '3x'"),
    (["compare", "--seq", "0"], "--seq"),
    (["compare", "--seq", "1k,2k"], "one length"),
    (["compare", "--normalizers", "topk:0"], "--normalizers: top-k needs k >= 1"),
    (["compare", "--heads", "0"], "--heads"),
    (["compare", "--timeout", "0"], "--timeout"),
    (["compare", "--min-run-time", "nan"], "--min-run-time"),
    (["compare", "--dtype", "int8"], "--dtype"),
    (["compare", "--device", "tpu"], "--device"),
    (["compare", "--out", "/dev/null/sub"], "--out"),
    (["plot", "/nonexistent/bench.json"], "not a file"),
    (["bench", "--providers", "flashmaps-softmax-torch[fwd=16,16]"], "pinned configs are for"),
    (["nosuch"], "invalid choice"),
], ids=["seq", "seq0", "normalizer", "providers", "mode", "heads", "max-call", "causal", "gqa", "compare-mode",
        "compare-seq", "compare-seq0", "compare-seqs", "topk0", "heads0", "timeout", "min-run-nan", "dtype",
        "device", "out", "plot-missing", "pinned-torch", "command"])
def test_usage_errors_are_one_line_and_exit_2(args, msg, capsys, tmp_path):
    """Every argument error: exit status 2, one line on stderr that names the argument once, no traceback."""
    has_out = args[0] in ("bench", "compare") and "--out" not in args
    assert main([*args, *(["--out", str(tmp_path)] if has_out else [])]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1 and err.startswith("flashmaps"), err
    named = re.match(r"(--[\w-]+): ", err.split("error: ", 1)[1])
    assert named is None or err.count(named.group(1) + ":") == 1, err  # not "--seq: --seq: ..."
    assert not any(tmp_path.iterdir())


def test_bench_takes_provider_names_with_options(tmp_path):
    name = "flashmaps-softmax-torch[flashmaps.kernels.topk.KMAX=64]"
    args = ["bench", "--out", str(tmp_path), "--seq", "32", "--modes", "fwd", "--normalizers", "softmax",
            "--providers", f"{name},sdpa", "--no-plot", *TINY]
    assert main(args) == 0
    rows = {r["provider"]: r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    assert set(rows) == {name, "sdpa"} and rows[name]["status"] == "ok"
    assert rows[name]["knobs"] == {"flashmaps.kernels.topk.KMAX": 64}


@pytest.mark.parametrize("args,msg", [
    (["gpu-check", "OUT"], "no CUDA device"),
    (["gpu-check", "--cpu-smoke", "OUT", "--suites", "h100-goals", "fast"], "unknown suite 'fast'"),
    (["gpu-check", "--cpu-smoke", "OUT", "--baseline-tree", "/nonexistent"], "not a checkout"),
    (["gpu-check", "--cpu-smoke", "OUT", "--knobs", "COLLECT"], "--knobs"),
    (["gpu-check", "--cpu-smoke", "OUT", "--knobs", "COLLECT=1"], "dotted attribute path"),
    (["gpu-check", "--cpu-smoke", "OUT", "--normalizers", "softmaxx"], "unknown normalizer"),
    (["gpu-check", "--cpu-smoke", "OUT", "--lengths", "4q"], "--lengths"),
    (["gpu-check", "--cpu-smoke", "OUT", "--modes", "sideways"], "unknown mode"),
    (["gpu-check", "--table", "/nonexistent/gpu-check.json"], "No such file"),
], ids=["no-cuda", "suite", "baseline", "knob-syntax", "knob-path", "normalizer", "lengths", "mode", "table"])
def test_gpu_check_usage_errors(args, msg, capsys, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert msg in err and err.startswith("flashmaps gpu-check: error:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_help_lists_gpu_check_and_the_registry_defaults(capsys):
    from flashmaps.normalizers import defaults

    assert main(["bench", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert " ".join(n.spec for n in defaults()) in text
    assert main(["gpu-check", "--help"]) == 0
    text = capsys.readouterr().out
    for word in ("--baseline-tree", "--prewarm", "--budget", "--cpu-smoke", "h100-goals", "tune", "long"):
        assert word in text


def test_python_dash_m_gpucheck_is_flashmaps_gpu_check():
    res = subprocess.run([sys.executable, "-m", "flashmaps.bench.gpucheck", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "--baseline-tree" in res.stdout and "flashmaps gpu-check" in res.stdout


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "compare" in out and "gpu-check" in out


def test_python_dash_m_flashmaps():
    res = subprocess.run([sys.executable, "-m", "flashmaps", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "bench" in res.stdout and "compare" in res.stdout
