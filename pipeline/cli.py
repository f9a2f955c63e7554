"""The `advpure` command: demo, run, report, list, make-shards, plan."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline.config import ConfigError
from pipeline.run.commit import CommitError


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipeline").setLevel(logging.INFO)


def cmd_run(args) -> int:
    from pipeline import config, report
    from pipeline.run import driver

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
    except CommitError as err:
        print(f"no results to summarise: {err}", file=sys.stderr)
    print(f"results: {output}  (advpure report {output})")


def cmd_demo(args) -> int:
    from pipeline import config, report
    from pipeline.run import driver
    from pipeline.train import demo

    path = demo.prepare(args.workdir, workers=args.workers)
    cfg = config.load(path)
    code, manifest = driver.run(cfg)
    _print_outcome(cfg.job.output, manifest, code, report)
    print(f"job config: {path}  (advpure run {path})")
    return code


def cmd_report(args) -> int:
    from pipeline import report
    from pipeline.io import storage

    fmt = "text" if args.format == "table" else args.format   # "table": the old name of text
    out = report.render(args.runs, fmt, args.stage, dataset=args.dataset, examples=args.examples)
    if isinstance(out, dict) and not args.output:   # robustbench: {file: ModelInfo}
        print(json.dumps({path: json.loads(text) for path, text in out.items()}, indent=2))
    elif isinstance(out, dict):
        for path, text in out.items():
            storage.put_text(storage.join(args.output, path), text)
            print(f"wrote {storage.join(args.output, path)}")
    elif args.output:
        storage.put_text(args.output, out)
        print(f"wrote {args.output}")
    else:
        print(out)
    return 0


def cmd_list(args) -> int:
    from pipeline.registry import ATTACKS, CLASSIFIERS, PURIFIERS

    for title, reg in (("classifiers", CLASSIFIERS), ("purifiers", PURIFIERS), ("attacks", ATTACKS)):
        print(f"{title}:")
        for name in reg.names():
            print(f"  {name:16s} {reg.describe(name)}")
    return 0


def cmd_make_shards(args) -> int:
    from pipeline.io.make_shards import make_shards

    options = {"labels": args.labels, "classes": args.classes} if args.source == "imagenet" else None
    doc = make_shards(args.source, args.out, path=args.path, split=args.split,
                      samples_per_shard=args.samples_per_shard, limit=args.limit, options=options)
    print(f"wrote {doc['total_samples']} samples in {len(doc['shards'])} shards: {doc['pattern']}")
    return 0


def cmd_purify(args) -> int:
    from pipeline.corpus import job

    overrides = list(args.set) + ([f"cluster.num_workers={args.workers}"] if args.workers else [])
    corpus = {"resize": args.resize, "crop": args.crop or None, "restore_size": args.restore_size or None,
              "jpeg_quality": args.jpeg_quality}
    cfg = job.build_config(args.shards, args.output, config_path=args.config, overrides=overrides,
                           purifier=args.purifier, params=job.key_values(args.params, "--params"),
                           classifier=args.classifier,
                           classifier_params=job.key_values(args.classifier_params, "--classifier-params"),
                           corpus=corpus)
    code, manifest = job.run(cfg)
    print(job.format_outcome(manifest))
    return code


def _purify_parser(sub) -> None:
    pu = sub.add_parser("purify", help="purify a WebDataset image corpus into shards of the same names "
                                       "(docs/corpus.md)")
    pu.add_argument("shards", help="input shards: a brace pattern, local, s3:// or https://")
    pu.add_argument("output", help="output folder (local or s3://): purified shards, indexes, records")
    pu.add_argument("--purifier", help="registered purifier (advpure list), required unless --config names one; "
                                       "`none` re-encodes and validates")
    pu.add_argument("--params", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                    help="purifier parameters, e.g. checkpoint=s3://models/score.pt sigma=0.25")
    pu.add_argument("--classifier", help="optional classifier: predictions before and after purification")
    pu.add_argument("--classifier-params", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    pu.add_argument("--config", help="YAML with the sections of `advpure run` (no attacks) and corpus:")
    pu.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    pu.add_argument("--resize", type=int, help="the purifier's resolution: images are resized to N×N")
    pu.add_argument("--crop", action="store_true", help="scale the shorter side to N and centre-crop (with --resize)")
    pu.add_argument("--restore-size", action="store_true", help="map purified images back to the input's size")
    pu.add_argument("--jpeg-quality", type=int, help="JPEG / lossy WebP output quality (default 95)")
    pu.add_argument("--workers", type=int, help="worker actors (cluster.num_workers)")
    pu.set_defaults(fn=cmd_purify)


def _address(args) -> str:
    import os

    from pipeline.run import submit

    return args.address or os.environ.get("RAY_API_SERVER_ADDRESS") or submit.DEFAULT_ADDRESS


def cmd_submit(args) -> int:
    from pipeline.run import submit

    if args.slurm:
        return _slurm_call(_slurm_submit)(args)
    address = _address(args)
    job_id = submit.submit(args.config, address, args.set, ship_code=not args.installed,
                           python=args.python or "python")
    print(f"submitted {job_id} to {address}")
    print(f"  advpure status {job_id} --address {address}")
    print(f"  advpure logs {job_id} --address {address} --follow")
    if not args.follow:
        return 0
    submit.logs(address, job_id, follow=True, write=lambda text: print(text, end="", flush=True))
    return _job_exit(submit.wait(address, job_id, timeout_s=60))


def _job_exit(status: str) -> int:
    return 0 if status in ("PENDING", "RUNNING", "SUCCEEDED") else 1


def cmd_status(args) -> int:
    from pipeline.run import submit

    if _is_slurm_job(args):
        return _slurm_call(_slurm_status)(args)
    doc = submit.status(_address(args), args.job_id)
    print(submit.format_status(doc))
    return _job_exit(doc["status"])


def cmd_logs(args) -> int:
    from pipeline.run import submit

    if _is_slurm_job(args):
        return _slurm_call(_slurm_logs)(args)
    submit.logs(_address(args), args.job_id, follow=args.follow, write=lambda text: print(text, end="", flush=True))
    return 0


def cmd_stop(args) -> int:
    from pipeline.run import submit

    if _is_slurm_job(args):
        return _slurm_call(_slurm_stop)(args)
    status = submit.stop(_address(args), args.job_id, timeout_s=args.timeout)
    print(f"{args.job_id}: {status}")
    return 0 if status in ("STOPPED", "SUCCEEDED", "FAILED") else 1


def _jobs_parser(sub) -> None:
    """submit / status / logs / stop: jobs on a running cluster through Ray's job API."""
    addr = {"help": "the cluster's job API (default: $RAY_API_SERVER_ADDRESS or http://127.0.0.1:8265)"}
    s = sub.add_parser("submit", help="submit a job to a Ray cluster (Ray Job Submission API)")
    s.add_argument("config")
    s.add_argument("--address", **addr)
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    s.add_argument("--installed", action="store_true",
                   help="use advpure as installed on the nodes instead of shipping this checkout's code")
    s.add_argument("--python", help="the nodes' interpreter for the entrypoint (default: python; with --slurm "
                                    "this interpreter, as on a shared filesystem)")
    s.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    _slurm_submit_options(s)
    s.set_defaults(fn=cmd_submit)
    for name, fn, text in (("status", cmd_status, "a submitted job's status (exit 1 if it failed or stopped)"),
                           ("logs", cmd_logs, "a submitted job's driver output"),
                           ("stop", cmd_stop, "stop a submitted job")):
        c = sub.add_parser(name, help=text)
        c.add_argument("job_id", help="a Ray submission id, or slurm:<id> for a Slurm job")
        c.add_argument("--address", **addr)
        c.add_argument("--slurm", action="store_true", help="JOB_ID is a Slurm job id (as slurm:<id>)")
        if name == "logs":
            c.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
        if name == "stop":
            c.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for it to stop")
        c.set_defaults(fn=fn)


# ---------------------------------------------------------------------------- Slurm (pipeline/run/slurm.py)
# `submit --slurm` and `status|logs|stop slurm:<id>` (or a numeric id with --slurm)

def _slurm_submit_options(s) -> None:
    g = s.add_argument_group("Slurm (--slurm: an sbatch job that starts its own Ray; docs/storage_and_cluster.md)")
    g.add_argument("--slurm", action="store_true", help="submit to Slurm with sbatch instead of a Ray cluster")
    g.add_argument("--nodes", type=int, default=1, help="nodes: one Ray head, the others Ray workers (default 1)")
    g.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (--gres=gpu:N; default 0)")
    g.add_argument("--cpus-per-node", type=int, help="CPUs per node (default: enough for the job's workers)")
    g.add_argument("--partition", help="Slurm partition (default: the cluster's default)")
    g.add_argument("--time", help="time limit, e.g. 4:00:00 (default: the partition's)")
    g.add_argument("--account", help="Slurm account to charge")
    g.add_argument("--qos", help="Slurm quality of service")
    g.add_argument("--sbatch-arg", action="append", default=[], metavar="OPTION",
                   help="another sbatch option, repeatable: --sbatch-arg=--mem=64G --sbatch-arg=--constraint=a100")
    g.add_argument("--start-timeout", type=float, default=300.0,
                   help="seconds the job waits for its Ray nodes and resources (default 300)")
    g.add_argument("--dry-run", action="store_true", help="print the sbatch script instead of submitting it")


def _is_slurm_job(args) -> bool:
    from pipeline.run import slurm

    return args.slurm or slurm.is_slurm_id(args.job_id)


def _slurm_submit(args) -> int:
    from pipeline.run import slurm

    req = slurm.Request(nodes=args.nodes, gpus_per_node=args.gpus_per_node, cpus_per_node=args.cpus_per_node,
                        partition=args.partition, time=args.time, account=args.account, qos=args.qos,
                        sbatch_args=tuple(args.sbatch_arg), start_timeout_s=args.start_timeout)
    script, job_id = slurm.submit(args.config, req, args.set, dry_run=args.dry_run, python=args.python,
                                  ship_code=not args.installed)
    if job_id is None:
        print(script, end="")
        return 0
    print(f"submitted {job_id}")
    for line in (f"advpure status {job_id}", f"advpure logs {job_id} --follow", f"advpure stop {job_id}"):
        print(f"  {line}")
    if not args.follow:
        return 0
    slurm.logs(job_id, follow=True, write=lambda text: print(text, end="", flush=True))
    return _slurm_exit(slurm.status(job_id)["status"])


def _slurm_exit(state: str) -> int:
    from pipeline.run import slurm

    return 0 if slurm.is_active(state) or state in slurm.SUCCEEDED else 1


def _slurm_status(args) -> int:
    from pipeline.run import slurm

    doc = slurm.status(args.job_id)
    print(slurm.format_status(doc))
    return _slurm_exit(doc["status"])


def _slurm_logs(args) -> int:
    from pipeline.run import slurm

    slurm.logs(args.job_id, follow=args.follow, write=lambda text: print(text, end="", flush=True))
    return 0


def _slurm_stop(args) -> int:
    from pipeline.run import slurm

    state = slurm.stop(args.job_id, timeout_s=args.timeout)
    print(f"{slurm.PREFIX}{slurm.slurm_id(args.job_id)}: {state}")
    return 1 if slurm.is_active(state) else 0


def _slurm_call(fn):
    """A Slurm command's handler: a request Slurm cannot satisfy is the user's mistake (exit 2)."""
    def call(args) -> int:
        from pipeline.run import slurm

        try:
            return fn(args)
        except slurm.RequestError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    return call

# ---------------------------------------------------------------------------- end of Slurm


def cmd_plan(args) -> int:
    from pipeline import config
    from pipeline.run import plan

    cfg = config.load(args.config, args.set)
    report = plan.plan(cfg, workers=args.workers, calibration_batches=args.batches, ray_startup=args.ray_startup)
    print(json.dumps(report, indent=1) if args.json else plan.format_plan(report))
    return 0


def _plan_parser(sub) -> None:
    pl = sub.add_parser("plan", help="predict a job's model evaluations, time and memory from one calibration "
                                     "batch per stage and attack (docs/performance.md)")
    pl.add_argument("config")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    pl.add_argument("--workers", type=int, nargs="+", default=None, help="worker counts to predict (default 1 2 4 8)")
    pl.add_argument("--batches", type=int, default=1, help="calibration batches per stage (default 1)")
    pl.add_argument("--ray-startup", action="store_true", help="measure a local Ray start and add it to wall times")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.set_defaults(fn=cmd_plan)


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

    rep = sub.add_parser("report", help="summarise runs from their Parquet records (docs/report.md)")
    rep.add_argument("runs", nargs="+", metavar="RUN", help="a job's output; two or more: paired comparison")
    rep.add_argument("--stage", default="evaluate")
    rep.add_argument("--format", choices=["text", "markdown", "html", "json", "robustbench", "table"],
                     default="text", help="html needs matplotlib (advpure[report])")
    rep.add_argument("-o", "--output", help="write to this file (robustbench: this folder) instead of stdout")
    rep.add_argument("--dataset", help="dataset name for --format robustbench (cifar10, imagenet, ...)")
    rep.add_argument("--examples", type=int, default=8, help="example images in --format html (0: none)")
    rep.set_defaults(fn=cmd_report)

    sub.add_parser("list", help="list registered classifiers, purifiers and attacks").set_defaults(fn=cmd_list)

    m = sub.add_parser("make-shards", help="convert a dataset into WebDataset shards")
    m.add_argument("source", choices=["digits", "mnist", "cifar10", "folder", "imagenet"])
    m.add_argument("out", help="output folder (local or s3://)")
    m.add_argument("--path", help="dataset folder (mnist idx files, cifar-10-batches-py, image folder, "
                                  "ImageNet validation folder)")
    m.add_argument("--labels", help="imagenet, flat folder: LOC_val_solution.csv or `<file> <wnid|index>` lines")
    m.add_argument("--classes", help="imagenet: class order, one WordNet id first per line (default: sorted ids)")
    m.add_argument("--split", default="test")
    m.add_argument("--samples-per-shard", type=int, default=1000)
    m.add_argument("--limit", type=int, default=None, help="stop after this many samples")
    m.set_defaults(fn=cmd_make_shards)

    _purify_parser(sub)
    _jobs_parser(sub)
    _plan_parser(sub)
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
    except KeyboardInterrupt:  # Ctrl-C: workers are killed and the job lease released on the way out
        print("interrupted: committed shards are kept; the same command resumes from them", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
