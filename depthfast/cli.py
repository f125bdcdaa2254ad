"""``depthfast``: one command with subcommands.

    depthfast run [RUN FLAGS]        one run (forwards to ``python -m depthfast.run``)
    depthfast compare BASE TUNED     the profile between two checkpoints, no training (depthfast.compare)
    depthfast sweep GRID.yaml        expand a grid of runs and run them (resumable), or --dry-run, --slurm
    depthfast report RUNS_DIR        aggregate every run under RUNS_DIR: table, figures, report.md

Also ``python -m depthfast.cli …``. Bad input ends with one line ``depthfast: error: …`` and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from depthfast.errors import DepthfastError, exit_status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="depthfast", description="Depth profile of fine-tuning: runs, sweeps, reports.")
    sub = parser.add_subparsers(dest="command", metavar="{run,compare,sweep,report}")
    sub.required = True
    sub.add_parser("run", help="one run; every flag of `python -m depthfast.run` (see `depthfast run --help`)",
                   add_help=False)
    sub.add_parser("compare", help="the depth profile between two checkpoints (hub ids, directories or a PEFT "
                   "adapter), no training (see `depthfast compare --help`)", add_help=False)

    sw = sub.add_parser("sweep", help="run a grid of configs (YAML: out, base, grid); resumable")
    sw.add_argument("grid", help="grid YAML file: out: DIR, base: {RunConfig fields}, grid: {field: [values]}")
    sw.add_argument("--out", help="sweep directory (overrides 'out:' in the grid file)")
    sw.add_argument("--workers", type=int, default=None,
                    help="parallel runs: default one per visible GPU, or 1 on a CPU machine")
    sw.add_argument("--dry-run", action="store_true", help="list the runs and what would be done; run nothing")
    sw.add_argument("--slurm", action="store_true",
                    help="write OUT/jobs.txt and OUT/sweep.sbatch (a SLURM array) instead of running")
    sw.add_argument("--slurm-option", action="append", default=[], metavar="OPT",
                    help="an #SBATCH option for --slurm, e.g. --slurm-option=--partition=gpu (repeatable)")

    rp = sub.add_parser("report", help="aggregate the runs under RUNS_DIR into a table, figures and report.md")
    rp.add_argument("runs_dir", help="a sweep directory (or any directory holding run directories)")
    rp.add_argument("--out", help="report directory (default RUNS_DIR/report)")
    rp.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples for correlations (default 2000)")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # e.g. while importing a subcommand, before its own handler runs
        print("depthfast: interrupted", file=sys.stderr)
        return 130


def console_main() -> int:
    """The ``depthfast`` console script: main(), with Ctrl-C and SIGTERM one line and exit 130 at any moment."""
    from depthfast.rundir import interrupt_exits_130  # first of all: Ctrl-C is one line from the first moment

    interrupt_exits_130()
    return main()


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run":  # everything after `run` belongs to depthfast.run's own parser
        from depthfast.run import main as run_main  # a subcommand loads its modules only when it runs

        return run_main(argv[1:])
    if argv and argv[0] == "compare":  # likewise for depthfast.compare's parser
        from depthfast.compare import main as compare_main  # likewise: torch loads only for a compare

        return compare_main(argv[1:])
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    def work():
        if args.command == "sweep":
            from depthfast.rundir import interrupts_raise
            from depthfast.sweep import sweep  # likewise

            interrupts_raise()  # the sweep stops its runs and writes its summary on Ctrl-C

            if args.workers is not None and args.workers < 1:
                raise DepthfastError(f"--workers must be ≥ 1; got {args.workers}")
            return sweep(args.grid, out=args.out, workers=args.workers, dry_run=args.dry_run, slurm=args.slurm,
                         slurm_options=args.slurm_option)
        from depthfast.report import report  # likewise

        return report(args.runs_dir, out=args.out, resamples=args.resamples)

    return exit_status(work)


if __name__ == "__main__":
    sys.exit(console_main())
