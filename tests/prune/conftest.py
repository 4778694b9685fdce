"""The trainer's synthetic teacher store, shared with the compression tests."""

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from tests.trainer.conftest import _one_thread, teacher_store, vocab_size  # noqa: F401


@pytest.fixture(scope="module")
def start_model(tmp_path_factory, vocab_size) -> str:  # noqa: F811 (vocab_size: the fixture)
    """A tiny random Llama (4 heads in 2 KV groups, tied embeddings): the model the compress tests prune."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("start")
    LlamaForCausalLM(cfg).save_pretrained(out)
    return str(out)
