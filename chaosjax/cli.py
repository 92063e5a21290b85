"""The ``chaosjax`` command line.

    chaosjax run [PRESET | CONFIG.toml] [--out DIR] [--set key=value ...] [--variant NAME ...]
                 [--resume] [--force]
    chaosjax presets
    chaosjax report RUN_DIR | MONITOR_LOG
    chaosjax config [PRESET | CONFIG.toml] [--set key=value ...]

Bad input gives one line naming the field and what is allowed, and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2
        self.exit(2, f"chaosjax: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="chaosjax", description="Neural-network training as a dynamical system.")
    sub = p.add_subparsers(dest="command", metavar="{run,presets,report,config}")
    r = sub.add_parser("run", help="run a preset or a TOML config (default: the quickstart preset)")
    r.add_argument("target", nargs="?", default=None, help="preset name or CONFIG.toml")
    r.add_argument("--out", default=None, help="output folder (default: runs/<name>)")
    r.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set training.learning_rates=[0.1,1.0]",
    )
    r.add_argument(
        "--variant",
        dest="variants",
        action="append",
        default=None,
        metavar="NAME",
        help="run only this variant of a preset (repeatable; default: every variant)",
    )
    r.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    r.add_argument("--force", action="store_true", help="overwrite an existing run folder")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument(
        "--devices",
        type=int,
        default=None,
        metavar="N",
        help="local devices per process sharing the replicas (sets scale.devices; default: every accelerator, one CPU device)",
    )
    r.add_argument(
        "--memory-limit",
        default=None,
        metavar="SIZE",
        help="device memory a run may use, e.g. 8GiB (sets scale.memory_limit)",
    )
    r.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="multi-process run: address of process 0 (jax.distributed)",
    )
    r.add_argument("--num-processes", type=int, default=1, metavar="N", help="processes in all")
    r.add_argument(
        "--process-id", type=int, default=0, metavar="I", help="this process's index (0 writes)"
    )
    sub.add_parser("presets", help="list the presets")
    rep = sub.add_parser(
        "report", help="re-render summary.md and figures of a run folder or a monitor log"
    )
    rep.add_argument("run_dir")
    c = sub.add_parser("config", help="print the resolved config (TOML) and the field reference")
    c.add_argument("target", nargs="?", default=None)
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("--variant", dest="variants", action="append", default=None, metavar="NAME")
    c.add_argument(
        "--fields", action="store_true", help="list every field with default and meaning"
    )
    return p


def _die(msg: str) -> int:
    print(f"chaosjax: error: {msg}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """The ``chaosjax`` command (``run``, ``report``, ``presets``, ``config``); returns the exit
    code: 0 done, 2 bad input (one line naming the field and the allowed values)."""
    args = _parser().parse_args(argv)
    command = args.command or "run"
    if args.command is None:
        args = _parser().parse_args(["run", *(argv or [])])

    from chaosjax.experiments import (
        ConfigError,
        RunFolderError,
        load_plan,
        preset_dict,
        preset_names,
        report,
        run_plan,
        to_toml,
    )

    try:
        if command == "presets":
            for name in preset_names():
                d = preset_dict(name)
                print(f"{name:28s} {d.get('description', '')}  [{d.get('runtime', '?')}]")
            return 0
        if command == "report":
            from chaosjax._monitor_report import find_monitor_log, report_monitor

            log = find_monitor_log(Path(args.run_dir))  # a Monitor's log, else a run folder
            path = report(Path(args.run_dir)) if log is None else report_monitor(log)
            print(f"re-rendered {path} and {path.parent / 'figures'}")
            return 0
        if command == "config":
            if args.fields:
                from chaosjax.experiments.config import describe

                for key, default, doc in describe():
                    print(f"{key:28s} {default:24s} {doc}")
                return 0
            for name, cfg in load_plan(args.target, args.overrides, args.variants):
                if name is not None:
                    print(f"# variant: {name}")
                print(to_toml(cfg), end="")
            return 0
        if args.devices is not None:
            if args.devices < 1:
                return _die(f"--devices: must be a positive device count, got {args.devices}")
            args.overrides.append(f"scale.devices={args.devices}")
        if args.memory_limit is not None:
            args.overrides.append(f"scale.memory_limit={args.memory_limit!r}")
        plan = load_plan(args.target, args.overrides, args.variants)
        if args.num_processes != 1 or args.coordinator:
            if not args.coordinator:
                return _die("--coordinator: required with --num-processes > 1 (HOST:PORT)")
            from chaosjax.sharding import initialize_distributed

            initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        out = Path(args.out) if args.out else Path("runs") / plan[0][1].name.split("/")[0]
        if args.resume and args.force:
            return _die("--resume and --force exclude each other")
        try:
            runs = run_plan(
                plan,
                out,
                resume=args.resume,
                force=args.force,
                progress=not args.quiet,
                announce=lambda msg: print(msg, file=sys.stderr),
            )
        except KeyboardInterrupt:
            print(
                f"\nchaosjax: interrupted; finished chunks are saved in {out}. Continue with:\n"
                f"  chaosjax run {args.target or ''} --out {out} "
                + " ".join(f"--set {o}" for o in args.overrides)
                + "".join(f" --variant {v}" for v in args.variants or [])
                + " --resume",
                file=sys.stderr,
            )
            return 130
        for run in runs:
            print(f"results: {run.folder / 'results.zarr'}")
        print(f"summary: {out / 'summary.md'}")
        print(f"figures: {', '.join(str(run.folder / 'figures') for run in runs)}")
        return 0
    except (ConfigError, RunFolderError) as e:
        return _die(str(e))
    except FileNotFoundError as e:
        return _die(str(e))
    except (ValueError, TypeError) as e:
        return _die(str(e).splitlines()[0] if str(e) else type(e).__name__)


__all__ = ["main"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
