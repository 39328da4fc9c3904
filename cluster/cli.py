"""The ``saeforge`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("saeforge")


def _train(args: argparse.Namespace) -> int:
    from cluster.config import compose_job
    from cluster.driver import run_job

    job = compose_job(args.overrides)
    logging.basicConfig(level=job.logging.level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("WANDB_MODE", job.logging.wandb_mode)
    result = run_job(job)
    ev = result.eval
    lines = [
        f"cache            {result.cache_uri} ({'reused' if result.cache_reused else 'built'})",
        f"tokens cached    {result.tokens_cached:,}",
        f"tokens trained   {ev.get('train_tokens', 0):,}",
        f"held-out FVU     {ev['fvu']:.4f}",
        f"held-out L0      {ev['l0']:.1f}",
        f"dead fraction    {ev['dead_fraction']:.4f}",
        f"wall time        {result.seconds:.0f} s",
        f"dictionary       {result.dictionary_uri}",
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _pull(args: argparse.Namespace) -> int:
    from cluster.pull import pull_dictionary

    cfg = pull_dictionary(args.uri, Path(args.target), s3_options={"endpoint_url": args.endpoint_url})
    sys.stdout.write(f"pulled {cfg['architecture']} dictionary d_in={cfg['d_in']} d_sae={cfg['d_sae']} to {args.target}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saeforge", description="Train sparse autoencoders on a Ray cluster.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="fill (or reuse) the activation cache and train a dictionary")
    train.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. sae.n_latents=8192 cache.uri=s3://bucket/prefix")
    train.set_defaults(func=_train)
    pull = sub.add_parser("pull", help="copy a dictionary from the object store and verify it")
    pull.add_argument("uri", help="dictionary URI: s3://bucket/.../dictionary/<hookpoint> or a local path")
    pull.add_argument("target", help="local directory to write into")
    pull.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL or AWS)")
    pull.set_defaults(func=_pull)
    return parser


def main(argv: list[str] | None = None) -> int:
    from activation_cache.schema import CorruptShardError
    from activation_cache.store import StoreError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, StoreError, CorruptShardError) as err:
        sys.stderr.write(f"saeforge {args.command}: error: {err}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
