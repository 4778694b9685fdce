"""Shared fixtures: a tiny tokenizer, corpus and teacher built in the test session (nothing downloaded)."""

from __future__ import annotations

import json
import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CHORUS_PROGRESS", "off")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = {
    "code": "def return import class self for while if else yield lambda None True False print range len".split(),
    "prose": "the a of and to in is that it was for on are as with his they at be this from".split(),
    "names": "LATIN CAPITAL SMALL LETTER WITH ACUTE GRAVE DIGIT SIGN MARK ARABIC GREEK CYRILLIC".split(),
}


def make_documents(n_per_domain: int = 40, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    docs = []
    for i in range(n_per_domain):
        for domain, words in WORDS.items():
            n = rng.randint(5, 60)
            docs.append({"text": " ".join(rng.choice(words) for _ in range(n)), "domain": domain, "id": f"{domain}-{i}"})
    return docs


def build_tokenizer(out_dir: str, texts: list[str], vocab_size: int = 300) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    fast.save_pretrained(out_dir)
    return out_dir


def build_tiny_llama(out_dir: str, vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def documents() -> list[dict]:
    return make_documents()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, documents) -> str:
    return build_tokenizer(str(tmp_path_factory.mktemp("tok")), [d["text"] for d in documents])


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory, documents) -> str:
    path = tmp_path_factory.mktemp("data") / "corpus.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in documents))
    return str(path)


@pytest.fixture(scope="session")
def prepared_store(tmp_path_factory, corpus_file, tokenizer_dir) -> str:
    """A small store: 3 domains, seq_len 32, 8 rows per shard (several shards), a validation split."""
    from chorus.commands import prepare
    from chorus.config import PrepareConfig

    out = str(tmp_path_factory.mktemp("stores") / "store.zarr")
    prepare.run(PrepareConfig(dataset=corpus_file, tokenizer=tokenizer_dir, out=out, seq_len=32,
                              domain_field="domain", valid_fraction=0.2, rows_per_shard=8))
    return out


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer_dir) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = build_tiny_llama(str(tmp_path_factory.mktemp("teacher")), len(tok))
    tok.save_pretrained(out)  # a teacher ships its tokenizer, as a hub model does
    return out


@pytest.fixture(scope="session")
def s3_endpoint():
    """S3 served on loopback by moto's server mode (real protocol, create-only writes enforced)."""
    from moto.server import ThreadedMotoServer

    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh bucket; returns (s3://bucket, storage_options)."""
    import boto3

    name = "chorus-" + "".join(c for c in request.node.name.lower() if c.isalnum())[:40]
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}", {"client_kwargs": {"endpoint_url": s3_endpoint}}
