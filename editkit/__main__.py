"""Command line: ``python -m editkit run study.yaml``, ``train`` and ``list``.

``run`` takes a YAML file of :class:`editkit.runs.StudyConfig` fields (the papermill
parameter files work as they are), runs or resumes the study, and writes the charts
next to the results. ``train`` trains the learned component of MEND or SERAC once for
a model (resuming an interrupted run) and saves it where the editor finds it:
``python -m editkit train mend --model smollm2-135m-instruct [--preset smoke|paper]
[--set name=value ...]``. ``list`` shows the registered editors, tasks and offline models.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="editkit", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run or resume a sequential-editing study from a YAML file")
    run.add_argument("config", help="YAML file of StudyConfig fields")
    run.add_argument("--results-dir", help="override results_dir")
    run.add_argument("--methods", nargs="+", help="run only these methods (default: the file's list)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.command == "list":
        from .benchmarks import list_tasks
        from .editors import list_editors
        from .models import CATALOG

        sys.stdout.write(f"editors: {', '.join(list_editors())}\n")
        sys.stdout.write(f"tasks:   {', '.join(list_tasks())}\n")
        sys.stdout.write(f"models:  {', '.join(sorted(CATALOG))} (or any hub id / local folder)\n")
        return 0

    if args.command == "train":
        from .models import load_model
        from .editors.trainer import train_editor

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

    from pathlib import Path

    from .config import load_yaml
    from .runs import StudyConfig, run_study
    from .viz import edit_quality_curves, save_chart, score_curves

    values = load_yaml(args.config)
    if args.results_dir:
        values["results_dir"] = args.results_dir
    if args.methods:
        values["methods"] = args.methods
    config = StudyConfig.from_dict(values, where=args.config)
    result = run_study(config, progress=not args.quiet)
    out = Path(config.results_dir)
    save_chart(score_curves(result.scores), out / "score_curves")
    if len(result.edit_quality):
        save_chart(edit_quality_curves(result.edit_quality), out / "edit_quality_curves")
    logging.getLogger("editkit").info("results in %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
