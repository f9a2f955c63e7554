"""The `advpure` command.

commands:
  demo         run the embedded default job (bundled digits; no downloads, no cluster)
  run          run a job described in YAML (configs/*.yaml)
  report       summarise runs from their Parquet records (text, markdown, html, json, robustbench)
  plan         predict a job's model evaluations, time and memory before running it
  make-shards  convert a dataset (digits, mnist, cifar10, an image folder, imagenet) into shards
  purify       purify a WebDataset image corpus into shards of the same names and keys
  submit       submit a job to a Ray cluster; then status, logs and stop by its id
  list         list the registered classifiers, purifiers and attacks
  config-schema  print the JSON Schema of a job file (for editors: completion and checks as you type)

`advpure COMMAND -h` describes each command's options; the README has a worked example.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline import stage_table
from pipeline.config import ConfigError
from pipeline.extras import MissingExtra
from pipeline.run.commit import CommitError
from pipeline.run.signals import Terminated, handle_sigterm, handled
from pipeline.run.submit import AuthError

SPLITS = ["test", "train", "all", "t10k", "t10k-fit", "t10k-holdout"]
DEFAULT_SPLIT = {"digits": "test", "mnist": "t10k", "cifar10": "test"}


def _version() -> str:
    import importlib.metadata

    import pipeline

    try:
        return importlib.metadata.version("advpure")
    except importlib.metadata.PackageNotFoundError:   # run from a checkout that is not installed
        return pipeline.__version__


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


def command_name() -> str:
    """How to call advpure again from this shell: `advpure` when that name on the PATH is this
    program, else the path this one was started by (after `make demo` without an activated
    .venv: `.venv/bin/advpure`), else `python -m pipeline.cli`."""
    import os
    import shutil

    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) != "advpure" or not os.path.exists(argv0):
        return "python -m pipeline.cli"
    on_path = shutil.which("advpure")
    if on_path and os.path.samefile(on_path, argv0):
        return "advpure"
    rel = os.path.relpath(argv0)
    return rel if rel.startswith(("..", "/")) else f".{os.sep}{rel}" if os.sep not in rel else rel


def _print_outcome(output: str, manifest: dict, code: int, report) -> None:
    for stage, st in manifest["stages"].items():
        if st.get("aborted"):
            print(f"stage {stage} ABORTED: {st['aborted']}\n  committed shards are kept; the same command "
                  "resumes from them", file=sys.stderr)
        for sid in st.get("quarantined", []):
            errs = st["shards"][sid]["errors"]
            print(f"shard {sid} QUARANTINED after {len(errs)} attempts: {errs[-1] if errs else ''}", file=sys.stderr)
    try:
        print(report.format_table(report.summarize_run(output)))
    except CommitError as err:
        print(f"no results to summarise: {err}", file=sys.stderr)
    print(f"results: {output}  (next: {command_name()} report {output})")


def cmd_demo(args) -> int:
    import os

    from pipeline import config, report
    from pipeline.run import driver
    from pipeline.train import demo

    path = demo.prepare(args.workdir, workers=args.workers)
    cfg = config.load(path)
    code, manifest = driver.run(cfg)
    _print_outcome(cfg.job.output, manifest, code, report)
    me = command_name()
    print(f"job config: {path}  ({me} run {path})")
    if me != "advpure":   # advpure is not on the PATH (make demo does not activate .venv)
        print(f"to call it as `advpure`: . {os.path.dirname(me) or '.'}/activate" if me.endswith("advpure")
              else "to call it as `advpure`: pip install -e . (or activate the .venv that has it)")
    return code


def cmd_report(args) -> int:
    from pipeline import report
    from pipeline.io import storage

    out = report.render(args.runs, args.format, args.stage, dataset=args.dataset, examples=args.examples)
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
    import inspect
    import shutil
    import textwrap

    from pipeline.registry import ATTACKS, CLASSIFIERS, PURIFIERS

    width = max(60, shutil.get_terminal_size((100, 24)).columns - 1)
    for title, reg in (("classifiers", CLASSIFIERS), ("purifiers", PURIFIERS), ("attacks", ATTACKS)):
        print(f"{title}:")
        for name in reg.names():
            # the docstring's first paragraph, whole (its first line alone may stop mid-sentence)
            text = " ".join((inspect.getdoc(reg.get(name)) or "").split("\n\n")[0].split())
            print(textwrap.fill(text, width, initial_indent=f"  {name:16s} ", subsequent_indent=" " * 19))
    return 0


def cmd_config_schema(args) -> int:
    from pipeline.config_schema import job_schema

    text = json.dumps(job_schema(args.draft), indent=2, ensure_ascii=False) + "\n"
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_make_shards(args) -> int:
    from pipeline.io.make_shards import make_shards

    options = {"labels": args.labels, "classes": args.classes} if args.source == "imagenet" else None
    split = args.split or DEFAULT_SPLIT.get(args.source, "test")
    doc = make_shards(args.source, args.out, path=args.path, split=split,
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
    pu.add_argument("--classifier-params", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                    help="classifier parameters, e.g. checkpoint=runs/demo/models/digits_cnn.pt")
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
    s.add_argument("config", help="the job's YAML, validated here before it is sent")
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
        c.add_argument("job_id", help="the id `advpure submit` printed: a Ray submission id "
                                      "(advpure-NAME-XXXXXXXX) or slurm:<id>")
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
    pl.add_argument("config", help="the job's YAML (as for advpure run)")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    pl.add_argument("--workers", type=int, nargs="+", default=None, help="worker counts to predict (default 1 2 4 8)")
    pl.add_argument("--batches", type=int, default=1, help="calibration batches per stage (default 1)")
    pl.add_argument("--ray-startup", action="store_true", help="measure a local Ray start and add it to wall times")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.set_defaults(fn=cmd_plan)


def _report_parser(sub) -> None:
    rep = sub.add_parser("report", help="summarise runs from their Parquet records (docs/report.md)")
    rep.add_argument("runs", nargs="+", metavar="RUN", help="a job's output; two or more: paired comparison")
    rep.add_argument("--stage", choices=stage_table.result_stages(), default=None,
                     help="which stage's records to report (default: the job's own — evaluate, else purify, "
                          "else attack; the report says which it shows)")
    rep.add_argument("--format", choices=["text", "markdown", "html", "json", "robustbench"], default="text",
                     help="text (default); markdown; html: one self-contained page with figures and example "
                          "images (needs matplotlib: pip install 'advpure[report]'); json: the whole report "
                          "document; robustbench: ModelInfo JSON files (with --dataset, -o FOLDER)")
    rep.add_argument("-o", "--output", help="write to this file (robustbench: this folder) instead of stdout")
    rep.add_argument("--dataset", help="dataset name for --format robustbench (cifar10, imagenet, ...)")
    rep.add_argument("--examples", type=int, default=8, help="example images in --format html (0: none)")
    rep.set_defaults(fn=cmd_report)


def _config_schema_parser(sub) -> None:
    cs = sub.add_parser("config-schema", help="print the JSON Schema (draft 2020-12) of a job file",
                        description="The JSON Schema of a job file, for editors that validate and complete "
                                    "YAML (README, 'A job': yaml-language-server, VS Code).")
    cs.add_argument("-o", "--output", help="write to this file instead of stdout")
    cs.add_argument("--draft", choices=["2020-12", "7"], default="2020-12",
                    help="JSON Schema dialect: 2020-12 (default) or 7, for editors whose YAML support "
                         "validates draft 7 only (VS Code's YAML extension warns on 2020-12)")
    cs.set_defaults(fn=cmd_config_schema)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="advpure", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    p.add_argument("--version", action="version", version=f"advpure {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="run the embedded default job (bundled digits, no downloads)")
    d.add_argument("--workdir", default="runs/demo",
                   help="folder for the demo's shards, cached models, job YAML and results (default runs/demo)")
    d.add_argument("--workers", type=int, default=2, help="worker actors, one CPU each (default 2)")
    d.set_defaults(fn=cmd_demo)

    r = sub.add_parser("run", help="run a job described in YAML")
    r.add_argument("config", help="the job's YAML (configs/*.yaml; README, 'A job')")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set attacks.0.params.eps=0.1")
    r.set_defaults(fn=cmd_run)

    _report_parser(sub)
    sub.add_parser("list", help="list registered classifiers, purifiers and attacks",
                   description="The registered components with their one-paragraph descriptions; each "
                               "method's doc under docs/ has its parameters.").set_defaults(fn=cmd_list)

    _config_schema_parser(sub)

    m = sub.add_parser("make-shards", help="convert a dataset into WebDataset shards")
    m.add_argument("source", choices=["digits", "mnist", "cifar10", "folder", "imagenet"],
                   help="digits: bundled with scikit-learn; mnist: idx files; cifar10: python batches; "
                        "folder: one sub-folder per class; imagenet: the validation images (resize 256, crop 224)")
    m.add_argument("out", help="output folder (local or s3://)")
    m.add_argument("--path", help="dataset folder (mnist idx files, cifar-10-batches-py, image folder, "
                                  "ImageNet validation folder)")
    m.add_argument("--labels", help="imagenet, flat folder: LOC_val_solution.csv or `<file> <wnid|index>` lines")
    m.add_argument("--classes", help="imagenet: class order, one WordNet id first per line (default: sorted ids)")
    m.add_argument("--split", choices=SPLITS, default=None, metavar="SPLIT",
                   help="digits: test (default; every 5th image), train (the rest) or all; mnist: t10k (default; "
                        "the 10,000 test images), t10k-fit (first 8,000), t10k-holdout (last 2,000) or train; "
                        "cifar10: test (default) or train; not used for folder and imagenet")
    m.add_argument("--samples-per-shard", type=int, default=1000,
                   help="samples per shard tar (default 1000); a job's work unit, retried and resumed whole")
    m.add_argument("--limit", type=int, default=None, help="stop after this many samples")
    m.set_defaults(fn=cmd_make_shards)

    _purify_parser(sub)
    _jobs_parser(sub)
    _plan_parser(sub)
    return p


def _from_sigterm(err: BaseException | None) -> bool:
    """True for Terminated, also when a Ray call it interrupted wrapped it (Ray's Cython
    raises SystemError 'returned a result with an exception set', the cause chained)."""
    while err is not None:
        if isinstance(err, Terminated):
            return True
        err = err.__cause__ or err.__context__
    return False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    handle_sigterm()
    code = _call(args)
    scheduler = sys.modules.get("pipeline.run.scheduler")
    if scheduler is not None and scheduler.cluster_lost():   # Ray's core would hang the exit, then exit 1
        import logging
        import os

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _call(args: argparse.Namespace) -> int:
    """The command, its user-facing errors as one line and an exit code."""
    try:
        return args.fn(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except (MissingExtra, AuthError) as err:   # the user's setup, before any work: what to install / set
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, RuntimeError, ValueError, KeyError) as err:
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: workers are killed and the job lease released on the way out
        print("interrupted: committed shards are kept; the same command resumes from them", file=sys.stderr)
        return 130
    except (Terminated, SystemError) as err:   # `advpure stop`, `ray job stop`: one line, not a stack dump
        if not _from_sigterm(err):
            raise
        handled()   # nothing pending: the command ends on it
        if args.command in ("run", "demo"):
            print("stopped (SIGTERM): workers were stopped and the job lease released; committed shards are kept "
                  "and the same command resumes from them", file=sys.stderr)
        else:
            print(f"stopped (SIGTERM): {args.command} did not finish", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
