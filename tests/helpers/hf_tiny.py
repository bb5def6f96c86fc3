"""Tiny randomly initialised transformers checkpoints with a locally trained tokenizer (no downloads)."""

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="the optional 'hf' extra (transformers) is not installed: pip install 'taperfx[hf]'"
)
from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402  (installed with transformers)

VOCAB = 128
CONTEXT = 64
SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "the bird sang a song at dawn",
    "once upon a time there was a small red fox",
    "she gave the old man a warm cup of tea",
]


def hf_model(arch: str, seed: int = 0):
    """A two-layer GPT-2 (LayerNorm, Conv1D, fused c_attn) or Llama (RMSNorm, q/k/v, SwiGLU, untied head)."""
    torch.manual_seed(seed)
    if arch == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=CONTEXT, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=1
        )
        return transformers.GPT2LMHeadModel(config).eval()
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        bos_token_id=1,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config).eval()


def save_checkpoint_dir(arch: str, out: Path) -> Path:
    """``out`` with the model, a byte-level BPE tokenizer trained on ``SENTENCES`` and ``corpus.txt``."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    tokenizer.train_from_iterator(
        SENTENCES * 4, trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=["<unk>", "<eos>"])
    )
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", unk_token="<unk>")
    hf_model(arch).save_pretrained(out)
    fast.save_pretrained(out)
    (out.parent / "corpus.txt").write_text("".join(f"{s}\n" for s in SENTENCES * 40))
    return out
