"""A store small enough for many real runs: 8 shards of 16 rows."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def small_store(tmp_path_factory, corpus_file, tokenizer_dir) -> str:
    from chorus.commands import prepare
    from chorus.config import PrepareConfig

    out = str(tmp_path_factory.mktemp("small") / "store.zarr")
    prepare.run(PrepareConfig(dataset=corpus_file, tokenizer=tokenizer_dir, out=out, seq_len=32, max_docs=40,
                              domain_field="domain", valid_fraction=0.25, rows_per_shard=16))
    return out
