"""bench/reproduce_realtext.py's plumbing on a tiny synthetic corpus: prepare, train the grid, resume an
interrupted run bit for bit, and report statistics that match the runs' own checkpoints and metrics."""

import json
import statistics
import sys
from pathlib import Path

import pytest

from taperfx.train.checkpoint import list_checkpoints, read_meta
from taperfx.train.corpus import synthetic_stories
from taperfx.train.loop import Trainer

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        import realtext_corpus
        import realtext_report
        import reproduce_realtext

        yield reproduce_realtext, realtext_report, realtext_corpus
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text("\n".join(synthetic_stories(300)) + "\n")
    return path


def argv(corpus, work, *extra):
    return [
        "--text", str(corpus), "--work", str(work), "--results", str(work / "results"), "--vocab-size", "320",
        "--depth", "1", "--steps", "8", "--batch-size", "2", "--context", "16", "--eval-interval", "2",
        "--eval-batches", "2", "--checkpoint-interval", "4", "--calibration-steps", "2", *extra,
    ]  # fmt: skip


@pytest.mark.slow  # eight short training runs, two tokenizers and two ONNX exports
def test_grid_report_and_resume(bench, corpus, tmp_path, monkeypatch):
    script, report, _ = bench
    script.main(
        argv(corpus, tmp_path / "a", "--variants", "baseline", "internal", "--seeds", "0", "1", "--samples", "3")
    )
    result = json.loads((tmp_path / "a" / "results" / "realtext_tiny_w64.json").read_text())
    runs = tmp_path / "a" / "realtext_tiny_w64"
    finals = {p.name: read_meta(list_checkpoints(p)[-1]) for p in runs.iterdir()}
    assert sorted(finals) == ["baseline-s0", "baseline-s1", "internal-s0", "internal-s1"]
    assert all(m["final"] and m["step"] == 8 for m in finals.values())
    assert finals["internal-s0"]["gate_zero"] and finals["internal-s0"]["protocol"] == "internal"
    loss = {name: m["val_loss"] for name, m in finals.items()}
    for variant in ("baseline", "internal"):
        row, values = result["table"][variant], [loss[f"{variant}-s0"], loss[f"{variant}-s1"]]
        assert row["seeds"] == 2 and row["mean"] == pytest.approx(statistics.fmean(values), rel=1e-12)
        assert row["std"] == pytest.approx(statistics.stdev(values), rel=1e-12)
    base = result["table"]["baseline"]["mean"]
    assert result["table"]["internal"]["gap_pct"] == pytest.approx(
        100 * (result["table"]["internal"]["mean"] / base - 1)
    )
    # Flatness: the change between the val loss at 80 % of the steps (step 6) and the end.
    records = [json.loads(x) for x in (runs / "baseline-s0" / "metrics.jsonl").read_text().splitlines()]
    at6 = next(r["val_loss"] for r in records if r["step"] == 6 and "val_loss" in r)
    assert result["runs"]["baseline-s0"]["change_last_20pct"] == pytest.approx((at6 - loss["baseline-s0"]) / at6)
    gaps = dict(map(tuple, result["crossings"]["internal"]["gap_live"]))
    assert sorted(gaps) == [2, 4, 6, 8] and gaps[8] == pytest.approx(
        statistics.fmean([loss["internal-s0"], loss["internal-s1"]]) - base
    )
    assert set(result["samples"]) == {"baseline (baseline-s0)", "internal (internal-s0)"}
    assert all(text.startswith(report.PROMPT) and len(text) > len(report.PROMPT) for text in result["samples"].values())
    assert all(Path(f).stat().st_size > 0 for f in result["figures"])

    # An interrupted run (stopped after its step-4 checkpoint) continues from it and ends as the uninterrupted one.
    original_save = Trainer.save

    def save_then_stop(self, val_loss, final):
        original_save(self, val_loss, final)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "save", save_then_stop)
    b = argv(corpus, tmp_path / "a", "--variants", "internal", "--seeds", "0", "--samples", "0", "--name", "again")
    with pytest.raises(KeyboardInterrupt):
        script.main(b)
    interrupted = tmp_path / "a" / "again" / "internal-s0"
    assert [read_meta(p)["step"] for p in list_checkpoints(interrupted)] == [4]
    monkeypatch.setattr(Trainer, "save", original_save)
    script.main(b)
    assert read_meta(list_checkpoints(interrupted)[-1])["val_loss"] == loss["internal-s0"]
    # Finished runs are not trained again.
    stamp = list_checkpoints(runs / "baseline-s0")[-1].stat().st_mtime_ns
    script.main(argv(corpus, tmp_path / "a", "--variants", "baseline", "--seeds", "0", "--samples", "0"))
    assert list_checkpoints(runs / "baseline-s0")[-1].stat().st_mtime_ns == stamp


def test_corpus_fetch_refuses_without_root(bench, monkeypatch):
    _, _, corpus = bench
    monkeypatch.setattr(corpus, "_installed", lambda name: False)
    monkeypatch.setattr(corpus.os, "geteuid", lambda: 1000)
    with pytest.raises(corpus.CorpusUnavailable) as caught:
        corpus.ensure_packages("austen")
    assert "r-cran-janeaustenr" in str(caught.value) and "apt-get install" in str(caught.value)


def test_paragraphs_join_blank_line_separated_blocks(bench):
    _, _, corpus = bench
    assert corpus.paragraphs(["CHAPTER 1", "", "It is a", "truth. ", "", "", "End"]) == [
        "CHAPTER 1",
        "It is a truth.",
        "End",
    ]
