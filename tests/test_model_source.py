"""The model source protocol: both kinds build, record themselves and come back from one dispatch."""

import json
import shutil

import pytest
import torch

from taperfx.models import HFSource, ModelConfig, ModelSource, source_from_dict
from taperfx.train.config import TrainConfig

from helpers.hf_tiny import CONTEXT, VOCAB, save_checkpoint_dir


def through_json(record: dict) -> dict:
    return json.loads(json.dumps(record))


def test_reference_config_is_a_source_and_round_trips():
    config = ModelConfig(arch="gpt2", vocab_size=50, dim=16, n_layers=1, n_heads=2, max_seq_len=24)
    back = source_from_dict(through_json(config.to_dict()))
    assert isinstance(back, ModelSource) and back == config
    assert (back.vocab_size, back.max_seq_len) == (50, 24)
    torch.manual_seed(0)
    built = back.build()
    torch.manual_seed(0)
    rebuilt = back.build_architecture()
    assert built.state_dict().keys() == rebuilt.state_dict().keys()
    assert all(torch.equal(built.state_dict()[k], rebuilt.state_dict()[k]) for k in built.state_dict())


def test_hf_source_round_trips_and_rebuilds_without_its_directory(tmp_path):
    path = save_checkpoint_dir("llama", tmp_path / "model")
    source = HFSource.from_directory(path, VOCAB)
    pretrained = source.build().state_dict()
    record = through_json(source.to_dict())
    shutil.rmtree(path)  # a checkpoint outlives the directory it was fine-tuned from
    back = source_from_dict(record)
    assert isinstance(back, HFSource) and isinstance(back, ModelSource) and back == source
    assert (back.vocab_size, back.max_seq_len) == (VOCAB, CONTEXT)
    fresh = back.build_architecture().state_dict()
    assert {k: v.shape for k, v in fresh.items()} == {k: v.shape for k, v in pretrained.items()}
    assert {v.dtype for v in fresh.values()} == {torch.float32}


def test_train_config_gives_a_source_of_either_kind(tmp_path):
    path = save_checkpoint_dir("gpt2", tmp_path / "model")
    hf = TrainConfig(init_from=f"hf:{path}").model_config(VOCAB)
    reference = TrainConfig(model={"preset": "tinystories-64", "max_seq_len": 32}).model_config(300)
    assert isinstance(hf, HFSource) and hf.path == path
    assert isinstance(reference, ModelConfig) and (reference.vocab_size, reference.max_seq_len) == (300, 32)
    assert all(isinstance(s, ModelSource) for s in (hf, reference))


def test_run_plan_resolves_context_and_accumulation_once(tmp_path):
    config = TrainConfig(model={"preset": "tinystories-64", "max_seq_len": 32}, batch_size=3, batch_tokens=1000)
    plan = config.plan(vocab_size=300, world=2)
    assert (plan.context, plan.config.grad_accum, plan.tokens_per_step) == (32, 6, 3 * 32 * 6 * 2)
    assert plan.source == config.model_config(300) and config.grad_accum == 1  # the caller's config is unchanged


@pytest.mark.parametrize("record", [[], {"arch": "llama", "dimm": 8}])  # not an object; a misspelt field
def test_malformed_reference_records_are_refused(record):
    with pytest.raises(ValueError):
        source_from_dict(record)


def test_damaged_hf_records_are_refused(tmp_path):
    record = HFSource.from_directory(save_checkpoint_dir("gpt2", tmp_path / "model")).to_dict()
    for key in record:  # either entry missing
        with pytest.raises(ValueError):
            source_from_dict({k: v for k, v in record.items() if k != key})
    config_key = next(k for k, v in record.items() if isinstance(v, dict))
    without_type = {k: v for k, v in record[config_key].items() if k != "model_type"}
    with pytest.raises(ValueError):  # not a transformers config
        source_from_dict({**record, config_key: without_type})
