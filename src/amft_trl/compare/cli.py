"""`amft-compare GRID.yaml`: run a comparison grid (resumable) and write its table and plots.

Exit status: 0 when the grid is finished and reported, 2 for a grid that cannot run (one `error:` line, before
anything trains), 130 when interrupted (Ctrl-C): finished runs are kept, and the same command resumes the rest.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amft-compare",
        description="Run every method of a grid over its seeds on one task, on identical data, rollouts, evaluation "
        "and budget, and write table.md, results.csv and plots. Finished runs are skipped and an interrupted run "
        "continues from its last checkpoint, so the same command finishes a grid over several sittings.",
    )
    parser.add_argument("grid", help="the grid's YAML file (see amft_trl.compare.grid)")
    parser.add_argument(
        "--output-dir",
        default=None,
        help="where runs and results go (default: compare/<grid file name without .yaml>)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results of a different grid found in --output-dir (they are kept otherwise)",
    )
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated: run only these methods of the grid (e.g. one process per core, disjoint sets, same "
        "--output-dir); the report covers every finished run",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the table and plots from finished runs"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from amft_trl.compare.grid import GridError, load_grid
    from amft_trl.compare.runs import run_grid
    from amft_trl.compare.summary import write_report

    output = Path(args.output_dir or Path("compare") / Path(args.grid).stem)
    try:
        grid = load_grid(args.grid)
        if args.report_only:
            paths = write_report(grid, output)
        else:
            methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
            run_grid(grid, output, overwrite=args.overwrite, progress=not args.no_progress, methods=methods)
            paths = {"table": output / "table.md"}
    except GridError as error:
        print(f"amft-compare: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # finished runs are kept; an unfinished one resumes from its last checkpoint
        print("\namft-compare: interrupted; run the same command again to resume.", file=sys.stderr)
        return 130
    print(Path(paths["table"]).read_text())
    print(f"amft-compare: results in {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
