"""Tasks with verifiable rewards: General Points (the AMFT paper's arithmetic card game)."""

from amft_trl.tasks.general_points import (
    GeneralPointsDatasets,
    build_general_points_datasets,
    demonstration,
    general_points_reward,
    generate_hands,
    is_solvable,
    make_prompt,
    rl_prompt_dataset,
    sft_dataset,
    solve,
)

__all__ = [
    "GeneralPointsDatasets",
    "build_general_points_datasets",
    "demonstration",
    "general_points_reward",
    "generate_hands",
    "is_solvable",
    "make_prompt",
    "rl_prompt_dataset",
    "sft_dataset",
    "solve",
]
