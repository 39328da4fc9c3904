"""The ``saeforge`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from cluster.jobs import add_job_commands
from cluster.logs import configure_logging, job_logging, quiet_third_party
from trainer.layout import EVAL_FILE

log = logging.getLogger("saeforge")


def _skipped_lines(ev: dict) -> list[str]:
    """The steps training skipped for NaN or Inf (``train.nonfinite``), if any."""
    batches, losses = ev.get("train_skipped_steps_nonfinite_batch", 0), ev.get("train_skipped_steps_nonfinite_loss", 0)
    if not batches and not losses:
        return []
    return [f"skipped steps    {batches + losses:,} ({batches:,} batches with NaN or Inf, "
            f"{ev.get('train_nonfinite_rows', 0):,} rows; {losses:,} non-finite losses)"]


def _train(args: argparse.Namespace) -> int:
    from cluster.config import compose_job

    job = compose_job(args.overrides)
    if args.cfg == "job":  # Hydra's convention: print the resolved config and stop
        from omegaconf import OmegaConf

        from cluster.config import to_dict

        sys.stdout.write(OmegaConf.to_yaml(to_dict(job)))
        return 0
    quiet_third_party()  # before the driver's imports reach DeepSpeed
    from cluster.driver import run_job

    os.environ.setdefault("WANDB_MODE", job.logging.wandb_mode)
    # After the imports: the third-party loggers they set up print to the job's log, not the console
    with job_logging(job.logging.level) as job_log:
        args.job_log = job_log  # its path ends the error line, should the job fail (main)
        result = run_job(job)
    lines = []
    for hp in result.hookpoints:
        ev = hp.eval
        lines += [
            f"hookpoint        {hp.hookpoint}" + (f"  (sweep variant {hp.variant})" if hp.variant else ""),
            f"cache            {hp.cache_uri} ({'reused' if hp.cache_reused else 'built'})",
            *([f"transcoder to    {hp.target_hookpoint}", f"target cache     {hp.target_cache_uri}"]
              if hp.target_hookpoint else []),
            f"tokens cached    {hp.tokens_cached:,}",
            f"tokens trained   {ev.get('train_tokens', 0):,}",
            *_skipped_lines(ev),
            f"held-out FVU     {ev['fvu']:.4f}",
            f"held-out L0      {ev['l0']:.1f}",
            f"dead fraction    {ev['dead_fraction']:.4f}",
            *([f"CE recovered     {ev['lm']['ce_recovered']:.4f}  (clean {ev['lm']['clean_ce']:.3f}, spliced "
               f"{ev['lm']['spliced_ce']:.3f}, ablated {ev['lm']['ablated_ce']:.3f}; KL {ev['lm']['kl_divergence']:.4f})"]
              if "lm" in ev else []),
            f"dictionary       {hp.dictionary_uri}",
            "",
        ]
    if job_log.path is not None:
        lines += [f"log              {job_log.path}", ""]
    lines += result.times.lines() if result.times else [f"wall time        {result.seconds:.0f} s"]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _pull(args: argparse.Namespace) -> int:
    from cluster.pull import pull

    pulled = pull(args.uri, Path(args.target), s3_options={"endpoint_url": args.endpoint_url})
    for folder, (_, cfg) in pulled.items():
        where = Path(args.target) / folder
        sys.stdout.write(f"pulled {cfg['architecture']} dictionary d_in={cfg['d_in']} d_sae={cfg['d_sae']} to {where}\n")
    return 0


def _cache(args: argparse.Namespace) -> int:
    from cluster import cache_cli

    s3_options = {"endpoint_url": args.endpoint_url}
    if args.cache_command == "ls":
        return cache_cli.ls_caches(args.uri, s3_options=s3_options, as_json=args.json)
    if args.cache_command == "inspect":
        return cache_cli.inspect_cache(args.uri, s3_options=s3_options, as_json=args.json)
    return cache_cli.verify_cache(args.uri, s3_options=s3_options, workers=args.workers)


def _cache_command(cache_sub: argparse._SubParsersAction, name: str, help_text: str, uri_help: str) -> argparse.ArgumentParser:
    command = cache_sub.add_parser(name, help=help_text)
    command.add_argument("uri", help=f"{uri_help}: s3://bucket/... or a local path")
    command.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL or AWS)")
    return command


def _add_cache_parser(sub: argparse._SubParsersAction) -> None:
    cache = sub.add_parser("cache", help="list, describe and verify activation caches")
    cache.set_defaults(func=_cache)
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    ls = _cache_command(cache_sub, "ls", "list the caches at a store root, a caches/ folder or one cache",
                        "store root, caches/ folder or cache")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect = _cache_command(cache_sub, "inspect", "describe one cache: key inputs, shard schema, size, statistics, orphans",
                             "cache (<root>/caches/<key>)")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    verify = _cache_command(cache_sub, "verify", "read every shard back and check it against the manifest (exit 1 if one is bad)",
                            "cache (<root>/caches/<key>)")
    verify.add_argument("--workers", type=int, default=8, help="shards read at once (default: 8)")


def _eval(args: argparse.Namespace) -> int:
    from cluster.evaluation import evaluate_stored, format_table

    configure_logging("INFO")
    evaluation = evaluate_stored(args.uri, s3_options={"endpoint_url": args.endpoint_url}, text=args.text,
                                 model=args.model, max_tokens=args.max_tokens)
    sys.stdout.write(format_table(evaluation) + f"\nwritten to       {args.uri}/{EVAL_FILE}\n")
    return 0


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    command = sub.add_parser("eval", help=f"splice a dictionary into its model on held-out text; add the figures to its {EVAL_FILE}")
    command.add_argument("uri", help="dictionary URI: s3://bucket/.../dictionary/<hookpoint> or a local path")
    command.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL or AWS)")
    command.add_argument("--max-tokens", type=int, default=None, help="tokens evaluated (default: the run's eval.max_tokens)")
    command.add_argument("--text", default=None, help="evaluate on this text source instead of the run's held-out text")
    command.add_argument("--model", default=None, help="model directory or packaged:... (default: the run's model)")
    command.set_defaults(func=_eval)


def _observed_texts(args: argparse.Namespace) -> list[str]:
    """The texts to observe: ``--text``, the whole of ``--file``, or each non-empty line of
    ``--prompts-file`` (each record's ``text`` field for a ``.jsonl`` file)."""
    if args.text is not None:
        return [args.text]
    path = Path(args.file or args.prompts_file)
    flag = "--file" if args.file else "--prompts-file"
    try:
        content = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{flag} {str(path)!r}: no such file") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{flag} {str(path)!r}: not UTF-8 text (byte {err.start})") from None
    if args.file:
        return [content]
    if path.suffix != ".jsonl":
        prompts = [line for line in content.splitlines() if line.strip()]
    else:
        prompts = []
        for number, line in enumerate(content.splitlines(), start=1):
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError as err:
                raise ValueError(f"--prompts-file {str(path)!r} line {number}: not JSON ({err.msg})") from None
            if record is not None and not isinstance(record.get("text") if isinstance(record, dict) else None, str):
                raise ValueError(f"--prompts-file {str(path)!r} line {number}: expected a JSON object with a string 'text'")
            prompts += [record["text"]] if record is not None else []
    if not prompts:
        raise ValueError(f"--prompts-file {str(path)!r}: no prompt in it (one per non-empty line)")
    return prompts


def _observe(args: argparse.Namespace) -> int:
    texts = _observed_texts(args)  # before anything loads
    if args.top < 1:
        raise ValueError(f"--top {args.top}: expected at least 1")
    from interp.observe import open_observer
    from interp.terminal import format_observations

    configure_logging("WARNING")
    observer = open_observer(args.uri, model=args.model, hookpoint=args.hookpoint,
                             s3_options={"endpoint_url": args.endpoint_url})
    result = observer.observe(texts, top=args.top, feature=args.feature, chat=args.chat)
    sys.stdout.write(format_observations(result))
    if args.json:
        Path(args.json).write_text(result.to_json() + "\n", encoding="utf-8")
        sys.stdout.write(f"written to {args.json}\n")
    if args.html:
        from interp.page import render_page

        Path(args.html).write_text(render_page(result), encoding="utf-8")
        sys.stdout.write(f"written to {args.html}\n")
    return 0


def _add_observe_parser(sub: argparse._SubParsersAction) -> None:
    command = sub.add_parser("observe", help="which features fire on a text, token by token, and what the dictionary leaves unexplained")
    command.add_argument("uri", help="dictionary: s3://bucket/.../dictionary/<hookpoint>, a local folder, or one SAELens wrote")
    texts = command.add_mutually_exclusive_group(required=True)
    texts.add_argument("--text", default=None, help="the text to observe")
    texts.add_argument("--file", default=None, help="observe the whole of this UTF-8 file as one text")
    texts.add_argument("--prompts-file", default=None, help="observe each non-empty line (a .jsonl file: each record's 'text')")
    command.add_argument("--top", type=int, default=5, help="features shown per token (default: 5)")
    command.add_argument("--feature", type=int, default=None, help="show this feature's activation at every token")
    command.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON")
    command.add_argument("--html", default=None, metavar="PATH", help="also write a self-contained page")
    command.add_argument("--chat", action="store_true", help="wrap each text in the tokenizer's chat template (as a user turn)")
    command.add_argument("--model", default=None, help="model directory or packaged:... (default: the dictionary's)")
    command.add_argument("--hookpoint", default=None, help="where the dictionary reads (needed for a SAELens hook name with no known mapping)")
    command.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL or AWS)")
    command.set_defaults(func=_observe)


def _feature_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--feature {text!r}: expected feature ids, e.g. 12 or 12,40") from None


def _steer(args: argparse.Namespace) -> int:
    from interp.steering import GenerationSettings, parse_value

    features = _feature_ids(args.feature)  # everything the command line alone can refuse, before anything loads
    parse_value(args.value)
    if args.html and not args.audit:
        raise ValueError(f"--html {args.html!r}: the page draws the audit; add --audit")
    if args.audit_tokens < 1:
        raise ValueError(f"--audit-tokens {args.audit_tokens}: expected at least 1")
    if args.seeds < 0:
        raise ValueError(f"--seeds {args.seeds}: expected 0 or more")
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, seed=args.seed)
    prompts = _observed_texts(argparse.Namespace(text=args.prompt, file=None, prompts_file=args.prompts_file))
    from interp.commands import AuditSettings, SteerRequest, prepare, run_steer
    from interp.terminal import format_steer

    request = SteerRequest(
        args.uri, tuple(features), args.value, tuple(prompts), mode=args.mode, error_term=args.error_term,
        chat=args.chat, generation=settings, model=args.model, hookpoint=args.hookpoint,
        s3_options={"endpoint_url": args.endpoint_url},
        audit=AuditSettings(text=args.text, max_tokens=args.audit_tokens, targets=tuple(args.target or ()),
                            seeds=args.seeds) if args.audit else None,
    )
    configure_logging("WARNING")
    prepared = prepare(request)  # the dictionary, model files, features, value and prompts checked before a model loads
    if args.address:
        from cluster.remote import run_on_cluster

        outcome = run_on_cluster(args.address, run_steer, request)  # the task prepares it again, on its node
    else:
        outcome = run_steer(request, prepared)
    sys.stdout.write(format_steer(outcome.steer))
    if outcome.audit is not None:
        from interp.terminal import format_audit

        sys.stdout.write("\n" + format_audit(outcome.audit))
    if args.json:
        data = outcome.steer.to_dict() | ({"audit": outcome.audit.to_dict()} if outcome.audit is not None else {})
        Path(args.json).write_text(json.dumps(data, indent=1, allow_nan=False) + "\n", encoding="utf-8")
        sys.stdout.write(f"written to {args.json}\n")
    if args.html and outcome.audit is not None:
        from interp.audit_page import render_audit_page

        Path(args.html).write_text(render_audit_page(outcome.audit), encoding="utf-8")
        sys.stdout.write(f"written to {args.html}\n")
    return 0


def _add_steer_parser(sub: argparse._SubParsersAction) -> None:
    command = sub.add_parser("steer", help="generate with and without an edit of a dictionary's features, side by side")
    command.add_argument("uri", help="dictionary: s3://bucket/.../dictionary/<hookpoint>, a local folder, or one SAELens wrote")
    command.add_argument("--feature", required=True, help="feature id(s) to edit, comma-separated")
    command.add_argument("--value", required=True,
                         help="raw activation units, or a multiple of each feature's largest held-out activation (10x)")
    command.add_argument("--mode", choices=["clamp", "add", "scale"], default="clamp",
                         help="clamp the features to the value, add it, or scale by it (default: clamp)")
    command.add_argument("--error-term", choices=["keep", "drop"], default="keep",
                         help="keep what the dictionary does not explain (default), or drop it as a naive splice does")
    prompts = command.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", default=None, help="the prompt to continue")
    prompts.add_argument("--prompts-file", default=None, help="continue each non-empty line (a .jsonl file: each record's 'text')")
    command.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template (as a user turn)")
    command.add_argument("--max-new-tokens", type=int, default=40, help="tokens generated per continuation (default: 40)")
    command.add_argument("--seed", type=int, default=None, help="sample with this seed (default: greedy)")
    command.add_argument("--json", default=None, metavar="PATH", help="also write the result (and the audit) as JSON")
    audit = command.add_argument_group("audit", "whether the steer moved the model or only the dashboard")
    audit.add_argument("--audit", action="store_true", help="audit the edit on held-out text of the run (or --text)")
    audit.add_argument("--text", default=None, help="audit on this text source (file, folder or packaged:...) instead")
    audit.add_argument("--audit-tokens", type=int, default=4096, help="tokens of audit text (default: 4096)")
    audit.add_argument("--target", action="append", default=None,
                       help="a target token string (repeatable; default: the tokens the feature promotes most)")
    audit.add_argument("--seeds", type=int, default=5, help="sampled continuations per prompt and variant (default: 5)")
    audit.add_argument("--html", default=None, metavar="PATH", help="also write the audit as a self-contained page")
    command.add_argument("--address", default=None,
                         help="run on this Ray cluster (host:port or ray://host:10001) as one task, beside its accelerators")
    command.add_argument("--model", default=None, help="model directory or packaged:... (default: the dictionary's)")
    command.add_argument("--hookpoint", default=None, help="where the dictionary reads (needed for a SAELens hook name with no known mapping)")
    command.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL or AWS)")
    command.set_defaults(func=_steer)


def _export(args: argparse.Namespace) -> int:
    from interp.circuit_tracer import CONFIG_FILE, clt_encoder_file, export_circuit_tracer

    files = export_circuit_tracer(args.uris, Path(args.out), model_name=args.model,
                                  s3_options={"endpoint_url": args.endpoint_url})
    where = Path(args.out).resolve()
    if clt_encoder_file(0) in files:
        n_layers = sum(clt_encoder_file(layer) in files for layer in range(len(files)))
        what, loader = f"a cross-layer transcoder over layers 0..{n_layers - 1}", f"load_clt on {where}"
    else:
        what, loader = f"{len(files) - 1} per-layer transcoders", f"load_transcoders on {where / CONFIG_FILE}"
    sys.stdout.write(f"wrote {what} for circuit-tracer to {where}\n"
                     f"load with: circuit-tracer attribute --transcoder_set {where} --backend nnsight ... "
                     f"(or {loader})\n")
    return 0


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="write dictionaries in a layout another tool loads")
    formats = export.add_subparsers(dest="export_format", required=True)
    command = formats.add_parser("circuit-tracer", help="per-layer MLP transcoders (layers 0..n-1) as circuit-tracer's "
                                 "config.yaml + layer_{i}.safetensors, or one cross-layer transcoder (all layers "
                                 "from 0) as its config.yaml + W_enc_{i} / W_dec_{i}.safetensors")
    command.add_argument("uris", nargs="+", help="transcoder dictionary URIs, one per layer, or one CLT folder: "
                         "s3://... or local paths")
    command.add_argument("--out", required=True, help="local directory to write into")
    command.add_argument("--model", default=None, help="model name for config.yaml (default: the dictionaries' model_name)")
    command.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL or AWS)")
    command.set_defaults(func=_export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saeforge", description="Train sparse autoencoders on a Ray cluster.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="fill (or reuse) the activation cache and train a dictionary")
    train.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. sae.n_latents=8192 cache.uri=s3://bucket/prefix")
    train.add_argument("--cfg", choices=["job"], default=None, help="print the resolved job config and exit")
    train.set_defaults(func=_train)
    pull = sub.add_parser("pull", help="copy a run's dictionaries (or one) from the object store, verified")
    pull.add_argument("uri", help="a run (s3://bucket/.../runs/<run>) or one dictionary (.../dictionary/<hookpoint>), or a local path")
    pull.add_argument("target", help="local directory to write into")
    pull.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL or AWS)")
    pull.set_defaults(func=_pull)
    _add_cache_parser(sub)
    _add_eval_parser(sub)
    _add_observe_parser(sub)
    _add_steer_parser(sub)
    _add_export_parser(sub)
    add_job_commands(sub)  # submit, status, logs, stop, list
    return parser


def main(argv: list[str] | None = None) -> int:
    from activation_cache.errors import CorruptShardError
    from activation_cache.store import StoreError
    from cluster.errors import JobFailed

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, StoreError, CorruptShardError, JobFailed) as err:
        command = " ".join(filter(None, (args.command, getattr(args, "cache_command", None),
                                             getattr(args, "export_format", None))))
        log_path = getattr(getattr(args, "job_log", None), "path", None)
        where = f" (the job's log: {log_path})" if log_path is not None else ""
        sys.stderr.write(f"saeforge {command}: error: {err}{where}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
