"""Inputs the commands' authors did not think of: each is refused with one line, its code and exit code.

A damaged file (emptied, truncated, JSON of the wrong shape), a file of another program, an option out of
range: none may reach a traceback, and none may leave an output behind.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from taperfx.cli import main
from taperfx.train.checkpoint import list_checkpoints
from taperfx.train.prepare import prepare_data

from helpers.cli_errors import error_code
from helpers.tiny_runs import TINY, tiny_cli_run, tiny_data

TRAIN = [f"--set={item}" for item in TINY]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A finished 4-step Internal-Taper run at gate 0."""
    return tiny_cli_run(data, tmp_path_factory, 4)


def copy_of(tree, tmp_path, name="copy"):
    return shutil.copytree(tree, tmp_path / name)


DAMAGED_JSON = ["", '{"format": 1, "mod', "[1, 2]", "5", '"model_type"', "\udcff"]


@pytest.mark.parametrize("content", DAMAGED_JSON, ids=["empty", "truncated", "list", "number", "string", "binary"])
def test_a_damaged_checkpoint_config_is_bad_data_in_every_command(run, tmp_path, capsys, content):
    ckpt = copy_of(list_checkpoints(run)[-1], tmp_path)
    (ckpt / "config.json").write_bytes(content.encode("utf-8", "surrogateescape"))
    commands = [
        ["eval", ckpt],
        ["generate", ckpt, "--prompt", "Once"],
        ["fold", ckpt, "-o", tmp_path / "out.pt2"],
        ["fold", ckpt, "-o", tmp_path / "out"],
        ["fold", ckpt, "--in-place"],
        ["export", "onnx", ckpt, "-o", tmp_path / "onnx"],
    ]
    for command in commands:
        assert main([str(a) for a in command]) == 3, command
        assert error_code(capsys) == "bad-json", command
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


@pytest.mark.parametrize("content", DAMAGED_JSON[2:5], ids=["list", "number", "string"])
def test_a_data_meta_of_the_wrong_shape_is_bad_data(run, data, tmp_path, capsys, content):
    prepared = copy_of(data, tmp_path)
    (prepared / "meta.json").write_text(content)
    assert main(["eval", str(run), "--data", str(prepared)]) == 3
    assert error_code(capsys) == "bad-json"


def test_plot_of_a_run_with_a_damaged_run_json_is_bad_data(run, tmp_path, capsys):
    damaged = copy_of(run, tmp_path)
    (damaged / "run.json").write_text("{")
    assert main(["plot", str(damaged), "--out", str(tmp_path / "plots")]) == 3
    assert error_code(capsys) == "bad-json"
    assert not (tmp_path / "plots").exists()


def _metrics_edited(run, tmp_path, value, keys=None):
    """A copy of ``run`` whose metrics hold ``value`` for ``keys`` (every number, grad norms included, if None)."""
    edited = copy_of(run, tmp_path)
    metrics = edited / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    for record in records:
        for table in (record, record.get("grad_norms", {})):
            for key, old in table.items():
                if type(old) is float and (keys is None or key in keys):
                    table[key] = value
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    return edited, records


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("key, metric", [("loss", "loss"), ("mlp", "grad_norms.mlp")])
def test_plot_leaves_out_a_series_that_is_not_finite_and_counts_it(run, tmp_path, capsys, value, key, metric):
    """A hand-edited loss of NaN (or inf) everywhere made the loss axis's limits NaN: matplotlib's traceback."""
    from taperfx.train.plot import plot_runs

    edited, records = _metrics_edited(run, tmp_path, value, keys={key})
    assert main(["plot", str(edited), "--out", str(tmp_path / "plots")]) == 0
    names = ["grad_norms.png", "loss.png", "scale.png", "schedule.png"]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == names
    figures = plot_runs([edited], tmp_path / "again")
    n_edited = sum(key in r or key in r.get("grad_norms", {}) for r in records)
    assert n_edited > 0 and figures.skipped == {str(edited): {metric: n_edited}}


def test_plot_refuses_a_run_without_a_finite_value(run, tmp_path, capsys):
    edited, _ = _metrics_edited(run, tmp_path, math.nan)
    assert main(["plot", str(edited), "--out", str(tmp_path / "plots")]) == 3
    assert error_code(capsys) == "nothing-to-plot"
    assert not (tmp_path / "plots").exists()


class _Doubler(torch.nn.Module):
    def forward(self, *inputs):
        return [x * 2 for x in inputs]


@pytest.mark.parametrize("n_inputs", [1, 2, 3])
def test_a_program_that_is_not_a_taperfx_decoder_is_bad_data(run, data, tmp_path, capsys, n_inputs):
    program = tmp_path / "other.pt2"
    example = tuple(torch.ones(1, 3, dtype=torch.long) for _ in range(n_inputs))
    torch.export.save(torch.export.export(_Doubler(), example), program)
    commands = [
        ["eval", program, "--data", data],
        ["generate", run, "--prompt", "Once", "--program", program],
        ["export", "onnx", program, "-o", tmp_path / "onnx"],
    ]
    for command in commands:
        assert main([str(a) for a in command]) == 3, command
        assert error_code(capsys) == "not-a-decoder", command
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.pt2"]


@pytest.mark.parametrize(
    "option, code",
    [
        (["--threads", "0"], "bad-threads"),
        (["--threads", "-2"], "bad-threads"),
        (["--threads", "100000"], "bad-threads"),
        (["--warmup", "-1"], "bad-warmup"),
        (["--repeats", "0"], "bad-repeats"),
        (["--stem", "../escaped"], "bad-stem"),
        (["--stem", "sub/name"], "bad-stem"),
        (["--stem", ".."], "bad-stem"),
    ],
)
def test_bench_options_out_of_range_are_refused_before_the_benchmark(tmp_path, capsys, option, code):
    threads = torch.get_num_threads()
    out = tmp_path / "results"
    small = ["--quick", "--backend", "eager", "--preset", "tinystories-64", "--vocab-size", "64"]
    assert main(["bench", "decode", *small, "--out", str(out), *option]) == 2
    assert error_code(capsys) == code
    assert torch.get_num_threads() == threads
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["checkpoint", "own-corpus"])
def test_data_prepare_into_a_directory_holding_a_tokenizer_or_corpus_is_refused(run, tmp_path, capsys, kind):
    """A stage whose file exists is skipped: a checkpoint's tokenizer.model, or a user's corpus.txt, would be
    taken as this prepare's (whatever --vocab-size asks for)."""
    if kind == "checkpoint":
        out = copy_of(list_checkpoints(run)[-1], tmp_path)
    else:
        out = tmp_path / "copy"
        out.mkdir()
        (out / "corpus.txt").write_text("my own notes, not stories\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["data", "prepare", "--out", str(out), "--vocab-size", "300", "--stories", "200"]) == 2
    assert error_code(capsys) == "prepared-differently"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_eval_refuses_data_of_another_tokenizer_and_accepts_the_same_one_prepared_again(run, tmp_path, capsys):
    """Ids of another tokenizer below the model's vocabulary size would be scored as other tokens, silently."""
    other = prepare_data(tmp_path / "other", n_stories=120, vocab_size=330)
    assert main(["eval", str(run), "--data", str(other)]) == 3
    assert error_code(capsys) == "tokenizer-mismatch"
    again = prepare_data(tmp_path / "again", n_stories=120, vocab_size=320)  # the run's settings, another directory
    assert main(["eval", str(run), "--data", str(again)]) == 0


def test_eval_of_a_folded_program_refuses_data_of_another_tokenizer(run, tmp_path, capsys):
    """The .pt2 records its tokenizer's vocabulary: ids of a smaller other tokenizer (all below the model's
    vocabulary size) were scored as other tokens, exit 0."""
    program = tmp_path / "folded.pt2"
    assert main(["fold", str(run), "-o", str(program)]) == 0
    other = prepare_data(tmp_path / "other", n_stories=120, vocab_size=314)
    capsys.readouterr()
    assert main(["eval", str(program), "--data", str(other)]) == 3
    assert error_code(capsys) == "tokenizer-mismatch"
    again = prepare_data(tmp_path / "again", n_stories=120, vocab_size=320)  # the run's settings, another directory
    assert main(["eval", str(program), "--data", str(again)]) == 0
    assert json.loads(capsys.readouterr().out)["tokenizer_checked"] is True


def test_eval_of_a_program_folded_without_a_tokenizer_record_scores_unchecked(run, tmp_path, capsys):
    """A .pt2 written before fold recorded the tokenizer still evaluates, and says its data went unchecked."""
    from taperfx.export.program import TOKENIZER_KEY, load_program, save_program

    program = tmp_path / "folded.pt2"
    assert main(["fold", str(run), "-o", str(program)]) == 0
    folded, meta = load_program(program)
    assert meta.pop(TOKENIZER_KEY)
    save_program(folded, program, meta)
    other = prepare_data(tmp_path / "other", n_stories=120, vocab_size=314)
    capsys.readouterr()
    assert main(["eval", str(program), "--data", str(other)]) == 0
    assert json.loads(capsys.readouterr().out)["tokenizer_checked"] is False


@pytest.mark.parametrize(
    "argv",
    [
        ["nonsense"],
        ["data"],
        ["export", "onnx", "ckpt"],
        ["eval", "ckpt", "--context", "0"],
        ["eval", "ckpt", "--batches", "many"],
        ["generate", "ckpt", "--prompt", "x", "--device", "tpu"],
        ["generate", "ckpt", "--prompt", "x", "--max-new-tokens", "abc"],
        ["data", "prepare", "--val-fraction", "nan"],
    ],
)
def test_usage_errors_are_one_line_with_a_code(capsys, argv):
    """argparse's own refusals take the same one-line form as every other expected failure (exit 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert error_code(capsys) == "usage"


def test_generate_refuses_a_program_folded_from_another_checkpoint(run, data, tmp_path, capsys):
    """The program would be decoded with the other checkpoint's tokenizer: garbage, silently."""
    other = tmp_path / "other"
    assert main(["train", "--data", str(data), "--out", str(other), "--steps", "4", "--set=seed=1", *TRAIN]) == 0
    program = tmp_path / "folded.pt2"
    assert main(["fold", str(run), "-o", str(program)]) == 0
    capsys.readouterr()
    assert main(["generate", str(other), "--prompt", "Once", "--program", str(program)]) == 2
    assert error_code(capsys) == "program-other-weights"
    assert main(["generate", str(run), "--prompt", "Once", "--program", str(program), "--max-new-tokens", "2"]) == 0


@pytest.mark.parametrize("content", [b"", b"hello", None], ids=["empty", "garbage", "truncated"])
def test_eval_names_a_damaged_checkpoint_tokenizer(run, data, tmp_path, capsys, content):
    ckpt = copy_of(list_checkpoints(run)[-1], tmp_path)
    tokenizer = ckpt / "tokenizer.model"
    tokenizer.write_bytes(tokenizer.read_bytes()[:10000] if content is None else content)
    assert main(["eval", str(ckpt), "--data", str(data)]) == 3
    assert error_code(capsys) == "not-sentencepiece"
    assert main(["fold", str(ckpt), "-o", str(tmp_path / "folded.pt2")]) == 3  # its record would be of no tokenizer
    assert error_code(capsys) == "not-sentencepiece"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


def test_a_tiny_temperature_samples_the_greedy_tokens(run, capsys):
    """logits / 1e-45 overflowed to inf and the probabilities to NaN: a traceback instead of (near) greedy text."""
    greedy = ["generate", str(run), "--prompt", "Once", "--max-new-tokens", "8"]
    assert main(greedy) == 0
    expected = capsys.readouterr().out
    assert main([*greedy, "--temperature", "1e-45", "--top-k", "5"]) == 0
    assert main([*greedy, "--temperature", "1e-45"]) == 0
    assert capsys.readouterr().out == expected * 2


def test_metrics_with_bytes_that_are_not_utf8_are_a_damaged_record(run, data, tmp_path, capsys):
    damaged = copy_of(run, tmp_path)
    with (damaged / "metrics.jsonl").open("ab") as f:
        f.write(b'{"step": 9, "loss": \xff\xfe}\n')
    assert main(["plot", str(damaged), "--out", str(tmp_path / "plots")]) == 3
    assert error_code(capsys) == "bad-metrics"
    resume = ["train", "--data", str(data), "--out", str(damaged), "--steps", "4", *TRAIN, "--resume"]
    assert main(resume) == 3
    assert error_code(capsys) == "bad-metrics"


@pytest.fixture(scope="module")
def folded(run, tmp_path_factory):
    """The run's checkpoint folded on disk (``taperfx fold RUN -o DIR``)."""
    out = tmp_path_factory.mktemp("folded") / "dir"
    assert main(["fold", str(run), "-o", str(out)]) == 0
    return out


def _truncate_shard(d):
    shard = d / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:3000])


def _edit_config(d, edit):
    meta = json.loads((d / "config.json").read_text())
    edit(meta)
    (d / "config.json").write_text(json.dumps(meta))


DAMAGE = {
    "truncated-shard": _truncate_shard,
    "missing-shard": lambda d: (d / "model.safetensors").unlink(),
    "index-not-a-table": lambda d: (d / "model.safetensors.index.json").write_text('{"weight_map": 5}'),
    "record-names-no-module": lambda d: _edit_config(d, lambda m: m["folded"].update(identity_norms=["no.such"])),
    "record-not-a-table": lambda d: _edit_config(d, lambda m: m.update(folded=5)),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_folded_checkpoint_is_bad_data(folded, data, tmp_path, capsys, damage):
    ckpt = copy_of(folded, tmp_path)
    DAMAGE[damage](ckpt)
    for command in (["eval", ckpt, "--data", data], ["generate", ckpt, "--prompt", "Once"]):
        assert main([str(a) for a in command]) == 3, command
        assert error_code(capsys) == "bad-checkpoint", command


RECORD_EDITS = {
    "model-not-a-table": lambda m: m.update(model=5),
    "model-field-of-wrong-type": lambda m: m["model"].update(dim="x"),
    "model-unknown-arch": lambda m: m["model"].update(arch="nope"),
    "tokenizer-not-a-name": lambda m: m.update(tokenizer=5),
    "train-not-a-table": lambda m: m.update(train=5),
}


@pytest.mark.parametrize("edit", RECORD_EDITS)
def test_a_checkpoint_config_with_fields_of_the_wrong_shape_is_bad_data(run, tmp_path, capsys, edit):
    ckpt = copy_of(list_checkpoints(run)[-1], tmp_path)
    _edit_config(ckpt, RECORD_EDITS[edit])
    for command in (["eval", ckpt], ["generate", ckpt, "--prompt", "Once"], ["fold", ckpt, "-o", tmp_path / "o"]):
        assert main([str(a) for a in command]) == 3, command
        assert error_code(capsys) == "bad-data", command


@pytest.mark.parametrize(
    "option, code",
    [
        (["--steps", "5"], "schedule-too-short"),
        (["--steps", "0"], "config-range"),
        (["--repeats", "0"], "bad-repeats"),
        (["--stories", "0"], "out-of-range"),
    ],
)
def test_a_refused_demo_writes_nothing(tmp_path, capsys, option, code):
    """Every setting is checked before the corpus is prepared: the refused directory is not created (its name,
    with a quote and a space, is no TOML to break either)."""
    out = tmp_path / "it's a demo"
    assert main(["demo", "--out", str(out), *option]) == 2
    assert error_code(capsys) == code
    assert not out.exists()


def test_a_fold_whose_output_another_process_fills_meanwhile_leaves_it_alone(run, tmp_path, capsys, monkeypatch):
    """Two `taperfx fold RUN -o DIR` at once: the one that finishes second finds DIR full when it renames its
    result into place; it must refuse (exit 2) and leave the winner's files and no temporary behind."""
    import taperfx.checkpoint_fold as checkpoint_fold

    out = tmp_path / "folded"
    spot_check = checkpoint_fold.spot_check

    def the_other_process_wins(*args, **kwargs):
        out.mkdir(exist_ok=True)
        (out / "config.json").write_text("{}")
        return spot_check(*args, **kwargs)

    monkeypatch.setattr(checkpoint_fold, "spot_check", the_other_process_wins)
    assert main(["fold", str(run), "-o", str(out)]) == 2
    assert error_code(capsys) == "output-exists"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folded"]
    assert [p.name for p in out.iterdir()] == ["config.json"] and (out / "config.json").read_text() == "{}"


@pytest.mark.parametrize("where", ["new-step-of-the-run", "inside-the-checkpoint"])
def test_fold_refuses_an_output_inside_the_checkpoints_it_reads(run, tmp_path, capsys, where):
    """`fold RUN -o RUN/checkpoints/step-9999999` made the folded copy the run's latest checkpoint: --resume and
    `fold RUN -o X.pt2` then failed on it."""
    copy = copy_of(run, tmp_path)
    latest = list_checkpoints(copy)[-1]
    out = latest.parent / "step-9999999" if where == "new-step-of-the-run" else latest / "folded"
    before = sorted(p.relative_to(copy) for p in copy.rglob("*"))
    assert main(["fold", str(copy), "-o", str(out)]) == 2
    assert error_code(capsys) == "output-inside-input"
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == before


def test_export_onnx_refuses_a_program_fold_already_quantized(run, tmp_path, capsys):
    """Its taperfx:: operators have no ONNX translation: a traceback from the exporter, an empty -o left behind."""
    program = tmp_path / "int8.pt2"
    assert main(["fold", str(run), "-o", str(program), "--quantize", "int8"]) == 0
    capsys.readouterr()
    for extra in ([], ["--quantize", "int4"]):
        assert main(["export", "onnx", str(program), "-o", str(tmp_path / "onnx"), *extra]) == 2, extra
        assert error_code(capsys) == "quantized-program", extra
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8.pt2"]


@pytest.mark.parametrize("content", [b"", b"hello"], ids=["empty", "garbage"])
def test_train_and_eval_name_a_damaged_data_tokenizer_before_writing(run, data, tmp_path, capsys, content):
    """train copied a damaged tokenizer.model into every checkpoint (generate failed on it only later)."""
    damaged = copy_of(data, tmp_path, "data")
    (damaged / "tokenizer.model").write_bytes(content)
    out = tmp_path / "run"
    assert main(["train", "--data", str(damaged), "--out", str(out), "--steps", "4", *TRAIN]) == 3
    assert error_code(capsys) == "not-sentencepiece"
    assert not out.exists()
    assert main(["eval", str(run), "--data", str(damaged)]) == 3
    assert error_code(capsys) == "not-sentencepiece"


def test_eval_refuses_more_windows_than_the_split_holds(run, capsys):
    """--batch-size and --batches of 1e8 allocated their product (numpy's MemoryError, a traceback)."""
    huge = ["eval", str(run), "--batch-size", "100000000", "--batches", "100000000"]
    assert main(huge) == 2
    assert error_code(capsys) == "too-many-windows"
    assert main(["eval", str(run), "--batch-size", "2", "--batches", "3"]) == 0


@pytest.mark.parametrize("field, value", [("data", 5), ("batch_size", "x"), ("context", -1)])
def test_eval_names_damaged_recorded_training_windows(run, tmp_path, capsys, field, value):
    ckpt = copy_of(list_checkpoints(run)[-1], tmp_path)
    _edit_config(ckpt, lambda m: m["train"].update({field: value}))
    assert main(["eval", str(ckpt)]) == 3
    assert error_code(capsys) == "bad-checkpoint"


def test_generate_says_a_directory_given_for_a_file_is_a_directory(run, tmp_path, capsys):
    """`export onnx -o DIR` then `generate --onnx DIR` was told DIR does not exist."""
    base = ["generate", str(run), "--prompt", "Once"]
    assert main([*base, "--onnx", str(tmp_path)]) == 2
    assert error_code(capsys) == "onnx-is-directory"
    assert main([*base, "--program", str(tmp_path)]) == 2
    assert error_code(capsys) == "program-is-directory"
