"""Which strategy should I use? A seeded, compute-matched comparison of the balancing strategies.

```python
from amft_trl.compare import load_grid, run_grid

run_grid(load_grid("benchmarks/grids/toy_addition.yaml"), "compare/toy_addition")
```

or `amft-compare benchmarks/grids/toy_addition.yaml --output-dir compare/toy_addition`.

- `grid`: the YAML grid (methods x seeds x one task, budget, shared settings, tuning, knob sweeps) and its checks;
- `methods`: what each method name means (`two_stage` is TRL's `SFTTrainer` then `GRPOTrainer`);
- `grid_tasks`: the tasks (data, reward, starting model, ID/OOD evaluation sets);
- `runs`: the runs (resumable, budgets measured), the tuning trials on the validation split;
- `stats`: means with Student-t intervals over seeds, paired differences to the reference;
- `summary`: `table.md`, `results.csv`, `runs.csv` and the plots;
- `sensitivity`: the report of knob sweeps (best, mean and worst over a knob grid, the default, AMFT vs fixed);
- `base_models`: the shipped starting checkpoint of the published toy grids (the same start on any machine).
"""

from amft_trl.compare.grid import Grid, GridError, load_grid, parse_grid
from amft_trl.compare.grid_tasks import TASKS, TaskData
from amft_trl.compare.methods import METHODS, Budget, Method
from amft_trl.compare.runs import run_grid
from amft_trl.compare.stats import Interval, mean_interval, paired_difference

__all__ = [
    "METHODS",
    "TASKS",
    "Budget",
    "Grid",
    "GridError",
    "Interval",
    "Method",
    "TaskData",
    "load_grid",
    "mean_interval",
    "paired_difference",
    "parse_grid",
    "run_grid",
]
