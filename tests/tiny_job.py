"""The tiny job the cluster tests run: the tiny model over the tiny corpus, 12 shards of 4 sequences."""

from __future__ import annotations

CONTEXT, SEQUENCES, PER_SHARD = 32, 48, 4


def tiny_job(uri: str, tmp_path, model_dir, corpus_dir, *extra: str):
    from cluster.config import compose_job

    return compose_job([
        "model=local", f"model.name_or_path={model_dir}", "model.hookpoint=resid_post.2", "model.batch_size=4",
        "data=text_files", f"data.source={corpus_dir}", f"data.context_length={CONTEXT}",
        f"data.max_tokens={CONTEXT * SEQUENCES}", f"cache.uri={uri}", f"cache.sequences_per_shard={PER_SHARD}",
        "sae.n_latents=128", "sae.k=8", "train.batch_size=64", "train.epochs=4", "train.lr=3e-3",
        "train.shuffle_buffer_rows=256", f"logging.dir={tmp_path / 'outputs'}", "run.name=tiny",
        "cluster.object_store_memory_bytes=209715200", *extra,
    ])
