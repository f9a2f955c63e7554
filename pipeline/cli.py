"""The `advpure` command: demo, run, report, list, make-shards."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline.config import ConfigError


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipeline").setLevel(logging.INFO)


def cmd_run(args) -> int:
    from pipeline import config, driver, report

    cfg = config.load(args.config, args.set)
    code, manifest = driver.run(cfg)
    _print_outcome(cfg.job.output, manifest, code, report)
    return code


def _print_outcome(output: str, manifest: dict, code: int, report) -> None:
    for stage, st in manifest["stages"].items():
        if st.get("aborted"):
            print(f"stage {stage} ABORTED: {st['aborted']}", file=sys.stderr)
        for sid in st.get("quarantined", []):
            errs = st["shards"][sid]["errors"]
            print(f"shard {sid} QUARANTINED after {len(errs)} attempts: {errs[-1] if errs else ''}", file=sys.stderr)
    try:
        print(report.format_table(report.summarize_run(output)))
    except report.ReportError as err:
        print(f"no results to summarise: {err}", file=sys.stderr)
    print(f"results: {output}  (advpure report {output})")


def cmd_demo(args) -> int:
    from pipeline import config, demo, driver, report

    path = demo.prepare(args.workdir, workers=args.workers)
    cfg = config.load(path)
    code, manifest = driver.run(cfg)
    _print_outcome(cfg.job.output, manifest, code, report)
    print(f"job config: {path}  (advpure run {path})")
    return code


def cmd_report(args) -> int:
    from pipeline import report

    summary = report.summarize_run(args.run_dir, args.stage)
    if args.format == "json":
        print(json.dumps(summary, indent=1))
    else:
        print(report.format_table(summary))
    return 0


def cmd_list(args) -> int:
    from pipeline.registry import ATTACKS, CLASSIFIERS, PURIFIERS

    for title, reg in (("classifiers", CLASSIFIERS), ("purifiers", PURIFIERS), ("attacks", ATTACKS)):
        print(f"{title}:")
        for name in reg.names():
            print(f"  {name:16s} {reg.describe(name)}")
    return 0


def cmd_make_shards(args) -> int:
    from pipeline.make_shards import make_shards

    doc = make_shards(args.source, args.out, path=args.path, split=args.split,
                      samples_per_shard=args.samples_per_shard, limit=args.limit)
    print(f"wrote {doc['total_samples']} samples in {len(doc['shards'])} shards: {doc['pattern']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="advpure", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run the embedded default job (bundled digits, no downloads)")
    d.add_argument("--workdir", default="runs/demo")
    d.add_argument("--workers", type=int, default=2)
    d.set_defaults(fn=cmd_demo)

    r = sub.add_parser("run", help="run a job described in YAML")
    r.add_argument("config")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set attacks.0.params.eps=0.1")
    r.set_defaults(fn=cmd_run)

    rep = sub.add_parser("report", help="summarise a run from its Parquet records")
    rep.add_argument("run_dir")
    rep.add_argument("--stage", default="evaluate")
    rep.add_argument("--format", choices=["table", "json"], default="table")
    rep.set_defaults(fn=cmd_report)

    sub.add_parser("list", help="list registered classifiers, purifiers and attacks").set_defaults(fn=cmd_list)

    m = sub.add_parser("make-shards", help="convert a dataset into WebDataset shards")
    m.add_argument("source", choices=["digits", "mnist", "cifar10", "folder"])
    m.add_argument("out", help="output folder (local or s3://)")
    m.add_argument("--path", help="dataset folder (mnist idx files, cifar-10-batches-py, image folder)")
    m.add_argument("--split", default="test")
    m.add_argument("--samples-per-shard", type=int, default=1000)
    m.add_argument("--limit", type=int, default=None, help="stop after this many samples")
    m.set_defaults(fn=cmd_make_shards)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.fn(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, RuntimeError, ValueError, KeyError) as err:
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
