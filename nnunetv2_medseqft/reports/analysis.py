"""``medseqft analyze``: the paper's robustness plots, loss landscapes (``landscape.py``) and parameter variation
(``params.py``), for runs. Outputs go to the (first) run's ``analysis/`` folder by default, where ``medseqft report``
finds the PNGs."""

from __future__ import annotations

from nnunetv2_medseqft.reports.landscape import *  # noqa: F401,F403 (the analysis API in one namespace)
from nnunetv2_medseqft.reports.landscape import landscape_for_runs
from nnunetv2_medseqft.reports.params import *  # noqa: F401,F403
from nnunetv2_medseqft.reports.params import params_for_runs


def _cmd_landscape(args) -> int:
    result = landscape_for_runs(args.run, args.task, args.models, grid=args.grid, two_d=args.two_d,
                                cases=args.cases, seed=args.seed, out=args.out, device=args.device)
    print(f"landscape written: {result['png']} and {result['json']}")
    return 0


def _cmd_params(args) -> int:
    summary = params_for_runs(args.runs, args.out, args.foundation)
    print(f"parameter variation written: {summary['png']} and {summary['json']}")
    return 0


def configure_parser(parser, name: str) -> None:
    sub = parser.add_subparsers(dest="analyze_command", metavar="ANALYSIS")
    sub.required = True
    p = sub.add_parser("landscape", help="loss/Dice along filter-normalised random directions around task models")
    p.add_argument("--run", action="append", required=True, metavar="RUN",
                   help="run name or folder (repeat for several runs on the same axes)")
    p.add_argument("--task", required=True, metavar="DATASET", help="task dataset (name or id) of the runs")
    p.add_argument("--models", nargs="+", choices=("M", "F"), default=["M"],
                   help="M: the task model M_t (default); F: the stage-A model F_t (methods that keep it)")
    p.add_argument("--grid", type=int, default=11, help="points per axis in [-1, 1] (default 11; odd keeps the "
                                                        "model itself on the grid)")
    p.add_argument("--2d", dest="two_d", action="store_true", help="2D grid (grid^2 evaluations per model)")
    p.add_argument("--cases", type=int, default=2, help="validation cases (first N of the fold), one centre patch "
                                                        "each (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random directions (default 0)")
    p.add_argument("--out", metavar="DIR", default=None, help="output folder (default: RUN/analysis of the first run)")
    p.add_argument("-device", "--device", default="cpu", choices=("cpu", "cuda", "mps"))
    p.set_defaults(func=_cmd_landscape)
    q = sub.add_parser("params", help="relative parameter change per layer group and effective rank of each update")
    q.add_argument("runs", nargs="+", metavar="RUN", help="run names or folders (one panel row per run)")
    q.add_argument("--out", metavar="DIR", default=None, help="output folder (default: RUN/analysis of the first run)")
    q.add_argument("--foundation", metavar="CKPT", default=None,
                   help="the runs' foundation, if it moved (default: the path in each manifest)")
    q.set_defaults(func=_cmd_params)
