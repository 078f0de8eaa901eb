"""Tasks with verifiable rewards: General Points (the AMFT paper's arithmetic card game), text and visual, with
the sequential-revision environment, and V-IRL navigation."""

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
from amft_trl.tasks.general_points_visual import (
    GeneralPointsRevisionEnv,
    GeneralPointsVisualDatasets,
    build_general_points_visual_datasets,
    general_points_revision_env_factory,
    general_points_verifier_reward,
    render_hand,
    verify_answer,
)
from amft_trl.tasks.virl import (
    VIRLDataError,
    VIRLNavigationEnv,
    build_virl_datasets,
    load_virl_data,
    virl_env_factory,
    virl_step_reward,
)

__all__ = [
    "VIRLDataError",
    "VIRLNavigationEnv",
    "build_virl_datasets",
    "load_virl_data",
    "virl_env_factory",
    "virl_step_reward",
    "GeneralPointsRevisionEnv",
    "GeneralPointsVisualDatasets",
    "build_general_points_visual_datasets",
    "general_points_revision_env_factory",
    "general_points_verifier_reward",
    "render_hand",
    "verify_answer",
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
