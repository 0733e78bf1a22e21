"""Command line: ``python -m editkit run study.yaml``, ``train`` and ``list``.

``run`` takes a YAML file of :class:`editkit.grid.StudyConfig` fields (the papermill
parameter files work as they are), runs or resumes every pending cell of the study
grid, and writes the charts next to the results. ``--list-cells`` prints one line per
cell (index, model, method, dataset, seed, batch size, state) without running
anything; ``--cell I`` (repeatable) runs only cell I, for array jobs. A cell that another
process is running is skipped (exit status 3 once the free cells are done) unless
``--wait SECONDS`` is given. ``--backend ray`` runs every chosen cell as a task of a Ray
cluster instead (``--address ADDR`` connects to one; without it a local instance is
started), each asking for ``--cpus-per-cell`` CPUs (default 1) and, where the cell's device
wants an accelerator and the cluster has GPUs, ``--gpus-per-cell`` GPUs (default 1); a cell
whose worker dies is run again up to ``--retries`` times (default 2) and resumes from its last
checkpoint. The results root must then be a path every node sees; exit status 1 when a cell
failed after its retries (each is named with its error), 3 when one was locked
(:mod:`editkit.backends`; needs ``pip install 'editkit[ray]'``). ``verify ROOT`` checks every
saved file of a results root against its checksums and lists what is wrong (exit status 1 if
anything is). ``report ROOT [--output FILE] [--title T]`` writes one static HTML page of a
results root's charts, findings tables and manifests (default ``ROOT/report.html``; exit
status 2 when ROOT holds no results).
``train`` trains the learned component of MEND or SERAC once for a model (resuming an
interrupted run) and saves it where the editor finds it:
``python -m editkit train mend --model smollm2-135m-instruct [--preset smoke|paper]
[--set name=value ...]``. ``list`` shows the registered editors, tasks and offline models.
"""

from __future__ import annotations

import argparse
import logging
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="editkit", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run or resume a sequential-editing study from a YAML file")
    run.add_argument("config", help="YAML file of StudyConfig fields")
    run.add_argument("--results-dir", help="override results_dir")
    run.add_argument("--methods", nargs="+", help="run only these methods (default: the file's list)")
    run.add_argument("--cell", type=int, action="append", metavar="I",
                     help="run only cell I (repeat for several; see --list-cells)")
    run.add_argument("--list-cells", action="store_true", help="list the grid's cells and their state, run nothing")
    run.add_argument("--no-charts", action="store_true", help="do not write the charts after the run")
    run.add_argument("--wait", type=float, metavar="SECONDS",
                     help="wait this long for a cell another process is running (default: skip it, exit 3)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--backend", choices=("local", "ray"), default="local",
                     help="local: the cells one after another in this process (default); ray: one Ray task per cell")
    run.add_argument("--address", help="--backend ray: the Ray cluster to connect to (default: start a local one)")
    run.add_argument("--retries", type=int, metavar="N",
                     help="--backend ray: runs of a cell again after its worker died or ran out of memory (default 2)")
    run.add_argument("--cpus-per-cell", type=float, metavar="N", help="--backend ray: CPUs per cell (default 1)")
    run.add_argument("--gpus-per-cell", type=float, metavar="N",
                     help="--backend ray: GPUs per cell whose device wants one, when the cluster has GPUs (default 1)")
    train = commands.add_parser("train", help="train MEND's or SERAC's learned component (resumes)")
    train.add_argument("method", help="a trained editor: mend or serac")
    train.add_argument("--model", default="smollm2-135m-instruct", help="catalog name, hub id or folder")
    train.add_argument("--preset", help="a named set of values from editkit/configs/<method>.yaml (smoke, paper)")
    train.add_argument("--config", help="YAML file of the editor's hyperparameters")
    train.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                       help="one hyperparameter (repeat; lists as a,b,c)")
    train.add_argument("--device", default=None, help="cpu (default), auto or a torch device")
    train.add_argument("--dtype", default="float32")
    train.add_argument("--force", action="store_true", help="retrain even if an artifact exists")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    commands.add_parser("list", help="registered editors, benchmark tasks and offline models")
    verify = commands.add_parser("verify", help="check every file of a results root against its checksums")
    verify.add_argument("results_dir", help="a study's results_dir")
    report = commands.add_parser("report", help="one static HTML page of a results root (charts, tables, manifests)")
    report.add_argument("results_dir", help="a study's results_dir")
    report.add_argument("--output", help="the HTML file to write (default: RESULTS_DIR/report.html)")
    report.add_argument("--title", help="the page's title (default: editkit report: <folder name>)")
    report.add_argument("--no-specs", action="store_true",
                        help="leave out each chart's Vega-Lite specification (smaller page for big roots)")
    return parser


def _verify(results_dir: str) -> int:
    from pathlib import Path

    from .results import verify_results

    if not Path(results_dir).is_dir():
        sys.stderr.write(f"{results_dir}: no such folder\n")
        return 2
    problems = verify_results(results_dir)
    for row in problems.itertuples():
        where = "" if row.n_edits is None or row.n_edits != row.n_edits else f" checkpoint {int(row.n_edits)}"
        sys.stdout.write(f"{row.run_id}{where}: {row.problem}\n")
    cells = len(list(Path(results_dir).glob("*/checkpoints")))
    sys.stdout.write(f"{len(problems)} problem(s) in {cells} cell(s) under {results_dir}\n")
    return 1 if len(problems) else 0


def _report(args: argparse.Namespace) -> int:
    from .report import NoResultsError, write_report

    try:
        path = write_report(args.results_dir, args.output, title=args.title, specs=not args.no_specs)
    except NoResultsError as error:
        logging.getLogger("editkit").error("%s", error)
        return 2
    sys.stdout.write(f"{path}\n")
    return 0


def _list() -> int:
    from .benchmarks import list_tasks
    from .datasets import list_edit_datasets
    from .editors import list_editors
    from .models import CATALOG

    sys.stdout.write(f"editors:  {', '.join(list_editors())}\n")
    sys.stdout.write(f"tasks:    {', '.join(list_tasks())}\n")
    sys.stdout.write(f"datasets: {', '.join(list_edit_datasets())}\n")
    sys.stdout.write(f"models:   {', '.join(sorted(CATALOG))} (or any hub id / local folder)\n")
    return 0


def _train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .editors.trainer import train_editor
    from .models import load_model

    overrides = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set expects NAME=VALUE, got {item!r}")
        overrides[name] = value.split(",") if "," in value else value
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    folder = train_editor(args.method, lm, preset=args.preset, config_file=args.config, force=args.force,
                          progress=not args.quiet, **overrides)
    sys.stdout.write(f"{folder}\n")
    return 0


_RAY_FLAGS = ("address", "retries", "cpus_per_cell", "gpus_per_cell")


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from pathlib import Path

    from .config import load_yaml
    from .runs import StudyConfig, cell_states, run_study

    if args.backend == "ray":
        from .backends import import_ray

        try:
            import_ray()
        except ImportError as error:
            parser.error(str(error))
    values = load_yaml(args.config)
    if args.results_dir:
        values["results_dir"] = args.results_dir
    if args.methods:
        values["methods"] = args.methods
    config = StudyConfig.from_dict(values, where=args.config)
    if args.list_cells:
        for row in cell_states(config):
            sys.stdout.write("{cell:>4}  {model}  {method}  {dataset}  seed={seed}  batch={edit_batch_size}  "
                             "{state}  {run_id}\n".format(**row))
        return 0
    from .backends import CellsFailedError, RayOptions, run_study_ray
    from .locks import CellLockedError

    given = {name: getattr(args, name) for name in _RAY_FLAGS if getattr(args, name) is not None}
    try:
        if args.backend == "ray":
            result = run_study_ray(config, RayOptions(**given), progress=not args.quiet, cells=args.cell,
                                   wait=args.wait)
        elif given:
            parser.error(f"{', '.join('--' + name.replace('_', '-') for name in given)} apply to --backend ray only")
        else:
            result = run_study(config, progress=not args.quiet, cells=args.cell, wait=args.wait)
    except CellsFailedError as error:  # each failure was logged with its traceback as it came back
        logging.getLogger("editkit").error("%s", error)
        return 1
    except CellLockedError as error:
        logging.getLogger("editkit").error("%s", error)
        return 3
    out = Path(config.results_dir)
    if not args.no_charts and len(result.scores):
        from .viz import edit_quality_curves, save_chart, score_curves
        from .viz_instruments import delta_curves, health_curves

        save_chart(score_curves(result.scores), out / "score_curves")
        if len(result.edit_quality):
            save_chart(edit_quality_curves(result.edit_quality), out / "edit_quality_curves")
        if len(result.deltas):
            save_chart(delta_curves(result.deltas), out / "delta_curves")
        if len(result.health):
            save_chart(health_curves(result.health), out / "health_curves")
    logging.getLogger("editkit").info("results in %s", out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the command; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "list":
        return _list()
    if args.command == "train":
        return _train(args, parser)
    if args.command == "verify":
        return _verify(args.results_dir)
    if args.command == "report":
        return _report(args)
    return _run(args, parser)


if __name__ == "__main__":
    sys.exit(main())
