"""`AMFTConfig`: `GRPOConfig` plus the SFT side, the balancing strategy and each strategy's parameters.

Only new parameters live here: everything else (loss_type, num_generations, beta, gradient accumulation, vLLM, PEFT,
logging) is TRL's `GRPOConfig`, unchanged. Each strategy validates its own fields (`check_config` in its module of
`amft_trl.balancing`); this class checks the shared ones and dispatches. The class docstring's `Parameters:` section (rendered in
`docs/source/amft_trainer.md`) lists every field with the paper symbol it stands for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from typing import Any

from trl import GRPOConfig

from .balancing import STRATEGIES, get_strategy_class
from .balancing.base import check_fraction, check_nonnegative

logger = logging.getLogger(__name__)


@dataclass
class AMFTConfig(GRPOConfig):
    r"""
    Configuration class for the [`AMFTTrainer`]: [`~trl.GRPOConfig`] plus the SFT side and a balancing strategy
    between SFT and GRPO.

    This class includes only the parameters that are specific to AMFT and the other balancing strategies. For the
    GRPO parameters (`loss_type`, `num_generations`, `beta`, vLLM, ...) see [`~trl.GRPOConfig`], for the rest
    [`~transformers.TrainingArguments`]; both apply unchanged.

    Every strategy trains on `w_RL * L_RL + w_SFT * L_SFT` (AMFT paper, Eq. 3, for `w = (1 - mu, mu)`), where `L_RL`
    is GRPO's loss on on-policy rollouts and `L_SFT` the NLL of demonstrations. `balancing` chooses how the weights
    are set; the default `"amft"` moves mu every optimizer step with Eq. 6:
    `mu <- clip(mu + meta_learning_rate * g_mu + entropy_learning_rate * (H* - H_t), mu_min, mu_max)`.

    For `"amft"`, a learning rate of 0 switches its term off and skips its computation; this is how the paper's
    ablations are expressed (entropy-only: `meta_learning_rate=0`; meta-only: `entropy_learning_rate=0`; without
    warm-up: `sft_warmup_steps=0`). Pinning `mu_min == mu_max` fixes mu: 0 is plain GRPO (no SFT data needed, no SFT
    forward), 1 is SFT only (no rollouts generated).

    Warm-up steps count inside `max_steps` (and inside the learning-rate schedule): with `max_steps=500` and
    `sft_warmup_steps=50`, the run does 50 SFT-only steps then 450 steps of the strategy.

    Parameters:
        > Parameters that control the balancing strategy

        balancing (`str`, *optional*, defaults to `"amft"`):
            How the SFT and RL losses are weighed: `"amft"` (Eq. 6 + Eq. 25), `"fixed"` (mu = `mu_init`),
            `"sft_then_rl"` (SFT for `sft_warmup_steps`, then GRPO only), `"chord"` (CHORD's mu schedule, optional
            phi), `"srft"` (SRFT's entropy-aware weights) or `"hpt"` (HPT's per-prompt SFT/RL switch).
        sft_warmup_steps (`int` or `None`, *optional*):
            W: optimizer steps of pure SFT before the strategy starts; no rollouts are generated during them. They
            count inside `max_steps`. `None`: the strategy's default (`"amft"` and `"fixed"`: 50, the paper's W;
            `"chord"`, `"srft"` and `"hpt"`: 0; `"sft_then_rl"` needs `sft_warmup_steps >= 1`: it is the length of
            its SFT stage).
        sft_warmup_learning_rate (`float` or `None`, *optional*):
            Peak learning rate of the SFT warm-up, which then gets a schedule of its own (`lr_scheduler_type` over
            the warm-up steps, with its own warm-up from `warmup_steps`), and the later phase a fresh one over the
            remaining steps at `learning_rate`. `None`: one schedule over all `max_steps`.
        reset_optimizer_after_warmup (`bool`, *optional*, defaults to `False`):
            Start the phase after the SFT warm-up with a fresh optimizer state (Adam moments and step count) and a
            fresh learning-rate schedule, as a two-stage SFT-then-RL pipeline would. Refused under DeepSpeed.

        > Parameters that control the SFT term (Eq. 2)

        sft_per_device_train_batch_size (`int` or `None`, *optional*):
            SFT demonstrations per device per micro-step (m in the paper; like `per_device_train_batch_size`). `None`: same as
            `per_device_train_batch_size`. Each optimizer step uses this x `gradient_accumulation_steps` x processes.
        max_sft_length (`int` or `None`, *optional*, defaults to `1024`):
            Maximum tokens of prompt + completion for an SFT example; longer ones are truncated on the right.
            Examples whose completion is truncated away entirely are dropped and reported. `None`: no limit.

        > Parameters that control the adaptive weight mu (`balancing="amft"`; `mu_init` also for `"fixed"`)

        mu_init (`float`, *optional*, defaults to `0.5`):
            Initial SFT weight mu_0 of `balancing="amft"` (paper: 0.5). Shared: it is also the constant mu of
            `balancing="fixed"` at every step after the warm-up (`fixed` has no mu field of its own; `mu_min` and
            `mu_max` do not apply to it).
        mu_min (`float`, *optional*, defaults to `0.05`):
            Lower clip bound of mu in Eq. 6 (paper: 0.05).
        mu_max (`float`, *optional*, defaults to `0.95`):
            Upper clip bound of mu in Eq. 6 (paper: 0.95).
        meta_learning_rate (`float`, *optional*, defaults to `0.02`):
            eta_mu in Eq. 6: step size of the meta-gradient term. With the default `meta_gradient_form="normalized"`
            it is the largest change of mu one meta step can make; the paper's 1e-4 belongs to the raw form. `0`
            disables the meta-gradient and its validation rollouts.
        meta_gradient_form (`str`, *optional*, defaults to `"normalized"`):
            Which g_mu enters Eq. 6. `"raw"`: Eq. 25 exactly, `-alpha * <grad U, grad L_SFT - grad L_RL>` with alpha
            the current policy learning rate. `"normalized"`: g_mu divided by the root of an exponential moving
            average of g_mu**2 (Adam's scaling applied to the scalar mu), clipped to [-1, 1].
        entropy_learning_rate (`float`, *optional*, defaults to `5e-4`):
            eta_H in Eq. 6: step size of the entropy term (paper: 5e-4). `0` disables it.
        meta_update_steps (`int`, *optional*, defaults to `20`):
            K: compute the meta-gradient every K mixed (post-warm-up) steps, the first one included.
        target_entropy (`float` or `None`, *optional*):
            H* in Eq. 6, in nats per token. `None`: measured right after the warm-up as the mean token entropy
            (temperature 1) of the policy on `target_entropy_num_samples` demonstrations.
        target_entropy_num_samples (`int`, *optional*, defaults to `64`):
            Number of demonstrations the target entropy H* is measured on.
        meta_val_batch_size (`int`, *optional*, defaults to `16`):
            Validation prompts per meta step (over all processes; a multiple of the number of processes); each gets
            `num_generations` rollouts, whose group-normalised advantages give the estimate of grad U.
        meta_diagnostics (`bool`, *optional*, defaults to `False`):
            Also compute |grad L_SFT - grad L_RL| and the cosine between grad U and the RL-minus-SFT direction at
            each meta step (logged as `amft/meta_cosine`). Needs two more gradient-sized buffers during meta steps.

        > Parameters that control CHORD (`balancing="chord"`, arXiv 2508.11408; ms-swift's names)

        chord_mu_warmup_steps (`int`, *optional*, defaults to `0`):
            Steps over which mu rises linearly from 0 to `chord_mu_peak` (0: start at the peak).
        chord_mu_decay_steps (`int`, *optional*, defaults to `200`):
            Steps over which mu decays from `chord_mu_peak` to `chord_mu_valley` (cosine); 0: none.
        chord_mu_peak (`float`, *optional*, defaults to `0.9`):
            The largest mu of the schedule.
        chord_mu_valley (`float`, *optional*, defaults to `0.05`):
            mu after the decay, until the end of training.
        chord_enable_phi_function (`bool`, *optional*, defaults to `False`):
            CHORD-phi: weight each demonstration token's NLL by `p * (1 - p)`, p its probability (detached).

        > Parameters that control SRFT (`balancing="srft"`, arXiv 2506.19767)

        srft_sft_coef (`float`, *optional*, defaults to `0.5`):
            The demonstrations' weight is `srft_sft_coef * exp(-H)`, H their detached mean token entropy.
        srft_rl_coef (`float`, *optional*, defaults to `0.1`):
            Positive-reward rollouts get weight `srft_rl_coef * exp(H)`, H their detached mean token entropy. The
            weight grows exponentially with H: about 0.3 at H = 1, 2 at H = 3 and 30 at H = 5.7 nats per token (a
            small or high-temperature model), with gradient norms to match.
        srft_rl_weight_max (`float` or `None`, *optional*):
            The largest weight a positive-reward rollout gets: `min(srft_rl_coef * exp(H), srft_rl_weight_max)`.
            `None`: no cap, the paper's rule (Eq. 11-12).

        > Parameters that control HPT (`balancing="hpt"`, arXiv 2509.04419)

        hpt_demonstration_column (`str`, *optional*, defaults to `"demonstration"`):
            The column of `train_dataset` that holds each prompt's demonstration (a string for standard prompts,
            assistant messages for conversational ones). `amft_trl.math_data` and `amft_trl.tasks` write it as
            `"demonstration"`; OpenR1-Math's is `"target"`.
        hpt_accuracy_threshold (`float`, *optional*, defaults to `0.0`):
            HPT's gate gamma: a prompt whose rollouts' accuracy is at or below it is trained on its demonstration
            (SFT) instead of its rollouts (RL). The paper: 0 for Qwen models, 0.25 (2 of 8) for Llama-3.1-8B.
        hpt_success_reward (`float`, *optional*, defaults to `1.0`):
            A rollout counts as correct when its reward (the weighted sum of the reward functions) is at least this.
        hpt_sft_coef (`float`, *optional*, defaults to `1.0`):
            HPT's beta: the weight of the demonstrations' NLL (reference scripts: 1.0 for 7B, 0.3 for 1.5B).

        > Parameters that control LUFFY (`balancing="luffy"`, arXiv 2504.14945)

        luffy_demonstration_column (`str`, *optional*, defaults to `"demonstration"`):
            The column of `train_dataset` that holds each prompt's demonstration (a string, or assistant messages for
            conversational prompts), put into the prompt's group as an off-policy rollout. OpenR1-Math's is
            `"target"`.
        luffy_num_off_policy (`int`, *optional*, defaults to `1`):
            How many of each prompt's `num_generations` rollouts are its demonstration instead of a generation (the
            paper: 1 of 8). `0` is plain GRPO.
        luffy_shaping_gamma (`float`, *optional*, defaults to `0.1`):
            gamma of the policy shaping `f(p) = p / (p + gamma)` on the demonstration tokens (the reference's
            `off_policy_reshape="p_div_p_0.1"`).

        > Parameters that control ReLIFT (`balancing="relift"`, arXiv 2506.07527)

        relift_demonstration_column (`str`, *optional*, defaults to `"demonstration"`):
            The column of `train_dataset` that holds each prompt's demonstration, buffered when all of the prompt's
            rollouts fail.
        relift_buffer_size (`int`, *optional*, defaults to `128`):
            When the buffer holds this many all-failed prompts, the next optimizer step fine-tunes on them instead of
            an RL step (the reference's 128). Must be divisible by processes x `gradient_accumulation_steps`.
        relift_fail_reward (`float`, *optional*, defaults to `0.0`):
            A rollout fails when its reward (the weighted sum of the reward functions) is at most this; a prompt is
            buffered when all its rollouts fail.
    """

    # ---- the strategy ----
    balancing: str = field(
        default="amft",
        metadata={
            "help": "How the SFT and RL losses are weighed: 'amft' (Eq. 6 + Eq. 25, the default), 'fixed' (mu = "
            "mu_init), 'sft_then_rl' (SFT for sft_warmup_steps, then GRPO only), 'chord' (CHORD's mu schedule, "
            "optional phi), 'srft' (SRFT's entropy-aware weights), 'hpt' (HPT's per-prompt SFT/RL switch), 'luffy' (LUFFY: the demonstration as an off-policy rollout in "
            "each GRPO group), 'relift' (ReLIFT: GRPO, and SFT on the buffered all-failed prompts when the buffer is "
            "full).",
            "choices": list(STRATEGIES),
        },
    )
    sft_warmup_steps: int | None = field(
        default=None,
        metadata={
            "help": "W: optimizer steps of pure SFT before the strategy starts; no rollouts are generated during "
            "them. They count inside max_steps. None: the strategy's default (amft and fixed: 50, the paper's W; "
            "chord, srft, hpt, luffy and relift: 0; sft_then_rl must set it: it is the length of its SFT stage)."
        },
    )
    sft_warmup_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Peak learning rate of the SFT warm-up phase, which then gets a schedule of its own "
            "(lr_scheduler_type over sft_warmup_steps, with its own warm-up from warmup_ratio/warmup_steps), and "
            "the later phase a fresh one over the remaining steps at learning_rate. None: one schedule over all "
            "max_steps at learning_rate (unless reset_optimizer_after_warmup)."
        },
    )
    reset_optimizer_after_warmup: bool = field(
        default=False,
        metadata={
            "help": "Start the phase after the SFT warm-up with a fresh optimizer state (Adam moments and step "
            "count) and a fresh learning-rate schedule, as a two-stage SFT-then-RL pipeline would."
        },
    )

    # ---- balancing="amft" and "fixed": the adaptive weight mu (Eq. 3, Eq. 6) ----
    mu_init: float = field(
        default=0.5,
        metadata={
            "help": "Initial SFT weight mu_0 of balancing='amft' (paper: mu_init = 0.5). Shared: it is also the "
            "constant mu of balancing='fixed' at every step after the warm-up (fixed has no mu field of its own; "
            "mu_min and mu_max do not apply to it)."
        },
    )
    mu_min: float = field(default=0.05, metadata={"help": "Lower clip bound of mu in Eq. 6 (paper: 0.05)."})
    mu_max: float = field(default=0.95, metadata={"help": "Upper clip bound of mu in Eq. 6 (paper: 0.95)."})
    meta_learning_rate: float = field(
        default=0.02,
        metadata={
            "help": "eta_mu in Eq. 6: step size of the meta-gradient term. With the default normalized form "
            "(meta_gradient_form='normalized') it is the largest change of mu one meta step can make. The paper's "
            "1e-4 belongs to the raw form (meta_gradient_form='raw'). 0 disables the meta-gradient and its "
            "validation rollouts."
        },
    )
    meta_gradient_form: str = field(
        default="normalized",
        metadata={
            "help": "Which g_mu enters Eq. 6. 'raw': Eq. 25 exactly, -alpha * <grad U, grad L_SFT - grad L_RL> with "
            "alpha the current policy learning rate. 'normalized': g_mu divided by the root of an exponential moving "
            "average of g_mu**2 (Adam's scaling applied to the scalar mu), clipped to [-1, 1]: meta_learning_rate is "
            "then the largest change of mu per meta step."
        },
    )
    entropy_learning_rate: float = field(
        default=5e-4,
        metadata={"help": "eta_H in Eq. 6: step size of the entropy term (paper: 5e-4). 0 disables it."},
    )
    meta_update_steps: int = field(
        default=20,
        metadata={
            "help": "K: compute the meta-gradient every K mixed (post-warm-up) steps, the first one included."
        },
    )
    target_entropy: float | None = field(
        default=None,
        metadata={
            "help": "H* in Eq. 6, in nats per token. None: measured right after the warm-up as the mean token "
            "entropy (temperature 1) of the policy on `target_entropy_num_samples` SFT demonstrations."
        },
    )
    target_entropy_num_samples: int = field(
        default=64,
        metadata={"help": "Number of SFT demonstrations the target entropy H* is measured on."},
    )
    meta_val_batch_size: int = field(
        default=16,
        metadata={
            "help": "Validation prompts per meta step (over all processes); each gets num_generations rollouts, "
            "whose group-normalised advantages give the policy-gradient estimate of grad U."
        },
    )
    meta_diagnostics: bool = field(
        default=False,
        metadata={
            "help": "Also compute |grad L_SFT - grad L_RL| and the cosine between grad U and the RL-minus-SFT "
            "direction at each meta step (logged as amft/meta_cosine). Needs two more gradient-sized buffers "
            "during meta steps; off, a meta step keeps one (grad U)."
        },
    )

    # ---- balancing="chord" (arXiv 2508.11408; ms-swift's field names) ----
    # Defaults: the CHORD-mu setting of the paper (0 / 200 / 0.9 / 0.05, as Trinity-RFT's example records it).
    # ms-swift has no defaults (all four must be set there); CHORD-phi uses 0 / 0 / 0.1 / 0.1 with the phi function.
    chord_mu_warmup_steps: int = field(
        default=0,
        metadata={
            "help": "CHORD: steps over which mu rises linearly from 0 to chord_mu_peak (0: start at the peak)."
        },
    )
    chord_mu_decay_steps: int = field(
        default=200,
        metadata={
            "help": "CHORD: steps over which mu decays from chord_mu_peak to chord_mu_valley (cosine); 0: none."
        },
    )
    chord_mu_peak: float = field(default=0.9, metadata={"help": "CHORD: the largest mu of the schedule."})
    chord_mu_valley: float = field(
        default=0.05, metadata={"help": "CHORD: mu after the decay, until the end of training."}
    )
    chord_enable_phi_function: bool = field(
        default=False,
        metadata={
            "help": "CHORD-phi: weight each demonstration token's NLL by p * (1 - p), p its probability (detached)."
        },
    )

    # ---- balancing="srft" (arXiv 2506.19767) ----
    srft_sft_coef: float = field(
        default=0.5,
        metadata={
            "help": "SRFT: the demonstrations' weight is srft_sft_coef * exp(-H), H their detached entropy."
        },
    )
    srft_rl_coef: float = field(
        default=0.1,
        metadata={
            "help": "SRFT: positive-reward rollouts get weight srft_rl_coef * exp(H), H their detached entropy "
            "(nats per token). The weight grows exponentially with H: about 0.3 at H = 1, 2 at H = 3, 30 at H = 5.7 "
            "(a small or high-temperature model), with gradient norms to match; srft_rl_weight_max caps it."
        },
    )
    srft_rl_weight_max: float | None = field(
        default=None,
        metadata={
            "help": "SRFT: the largest weight a positive-reward rollout gets, min(srft_rl_coef * exp(H), this). None "
            "(the default): no cap, the paper's rule (Eq. 11-12)."
        },
    )

    # ---- balancing="hpt" (arXiv 2509.04419) ----
    hpt_demonstration_column: str = field(
        default="demonstration",
        metadata={
            "help": "HPT: the column of train_dataset that holds each prompt's demonstration (the completion to "
            "imitate: a string for standard prompts, assistant messages for conversational ones). The builders of "
            "amft_trl.math_data and amft_trl.tasks write it as 'demonstration'; OpenR1-Math's is 'target'."
        },
    )
    hpt_accuracy_threshold: float = field(
        default=0.0,
        metadata={
            "help": "HPT's gate gamma: a prompt whose rollouts' accuracy (the fraction of them that are correct) is "
            "at or below it is trained on its demonstration (SFT) instead of its rollouts (RL). The paper: 0 for "
            "Qwen models, 0.25 (2 of 8) for Llama-3.1-8B."
        },
    )
    hpt_success_reward: float = field(
        default=1.0,
        metadata={
            "help": "HPT: a rollout counts as correct when its reward (the weighted sum of the reward functions) is at "
            "least this."
        },
    )
    hpt_sft_coef: float = field(
        default=1.0,
        metadata={
            "help": "HPT's beta: the weight of the demonstrations' NLL (reference scripts: 1.0 for 7B, 0.3 for 1.5B)."
        },
    )

    # ---- balancing="luffy" (arXiv 2504.14945; reference github ElliottYan/LUFFY) ----
    luffy_demonstration_column: str = field(
        default="demonstration",
        metadata={
            "help": "LUFFY: the column of train_dataset that holds each prompt's demonstration (a string for "
            "standard prompts; a string or assistant messages for conversational ones), used as an off-policy "
            "rollout of the prompt's group. OpenR1-Math's is 'target'."
        },
    )
    luffy_num_off_policy: int = field(
        default=1,
        metadata={
            "help": "LUFFY: how many of each prompt's num_generations rollouts are its demonstration instead of a "
            "generation (the paper: 1 of 8). 0: plain GRPO."
        },
    )
    luffy_shaping_gamma: float = field(
        default=0.1,
        metadata={
            "help": "LUFFY: gamma of the policy shaping f(p) = p / (p + gamma) on the demonstration tokens (the "
            "reference's off_policy_reshape='p_div_p_0.1')."
        },
    )

    # ---- balancing="relift" (arXiv 2506.07527; reference github TheRoadQaQ/ReLIFT) ----
    relift_demonstration_column: str = field(
        default="demonstration",
        metadata={
            "help": "ReLIFT: the column of train_dataset that holds each prompt's demonstration (a string for "
            "standard prompts; a string or assistant messages for conversational ones), buffered when all of the "
            "prompt's rollouts fail. OpenR1-Math's is 'target'."
        },
    )
    relift_buffer_size: int = field(
        default=128,
        metadata={
            "help": "ReLIFT: when the buffer holds this many all-failed prompts, the next optimizer step fine-tunes "
            "on the newest this many of them instead of an RL step (the reference's sft_data_size: 128, its batch's "
            "prompt count). Must be divisible by processes x gradient_accumulation_steps."
        },
    )
    relift_fail_reward: float = field(
        default=0.0,
        metadata={
            "help": "ReLIFT: a rollout fails when its reward (the weighted sum of the reward functions) is at most "
            "this (the reference: its verifier's fail value, 0); a prompt is buffered when all its rollouts fail."
        },
    )

    # ---- the SFT side (Eq. 2) ----
    sft_per_device_train_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "SFT demonstrations per device per micro-step (like per_device_train_batch_size). None: same as "
            "per_device_train_batch_size. Each optimizer step uses this x gradient_accumulation_steps x processes."
        },
    )
    max_sft_length: int | None = field(
        default=1024,
        metadata={
            "help": "Maximum tokens of prompt + completion for an SFT example; longer ones are truncated on the "
            "right. Examples whose completion is truncated away entirely are dropped and reported. None: no limit."
        },
    )

    def __post_init__(self):
        strategy = get_strategy_class(self.balancing)
        if self.sft_warmup_steps is None:
            self.sft_warmup_steps = strategy.default_sft_warmup_steps()
            if (
                self.sft_warmup_steps is None
            ):  # the strategy has no default: the length of its SFT stage is the run
                raise ValueError(
                    f"`{self.balancing}` needs `sft_warmup_steps` >= 1 (the optimizer steps of its SFT stage); it has "
                    "no default for this strategy: set it."
                )
        self._validate_shared_fields()
        strategy.check_config(self)
        if (
            isinstance(self.max_steps, int) and self.max_steps > 0
        ):  # else known at train(): the strategy checks it
            strategy.check_run_length(self.sft_warmup_steps, self.max_steps, "max_steps", stacklevel=4)
        self._warn_about_other_strategies_fields()
        if self.bf16 is None and not self.fp16 and not _bf16_accelerator_available():
            # TRL defaults bf16 to True, which transformers refuses on a machine without a bf16 accelerator: train
            # in float32 there instead, so that the same script runs on a laptop.
            logger.info("AMFTConfig: no bf16-capable accelerator found; training in float32 (bf16=False).")
            self.bf16 = False
        super().__post_init__()
        check_optimizer_settings(self, self.max_steps if self.max_steps > 0 else 1000)

    def _validate_shared_fields(self) -> None:
        # TrainingArguments accepts any learning rate; torch's optimizer refuses a negative one only when the trainer
        # builds it, after the model is loaded (or, in a comparison grid, in the middle of the grid).
        check_nonnegative(self, "learning_rate")
        check_fraction(self, "mu_init")
        if not isinstance(self.sft_warmup_steps, int) or self.sft_warmup_steps < 0:
            raise ValueError(f"`sft_warmup_steps` must be an integer >= 0, got {self.sft_warmup_steps!r}.")
        check_nonnegative(self, "sft_warmup_learning_rate", allow_none=True)
        if (self.sft_warmup_learning_rate is not None or self.reset_optimizer_after_warmup) and not (
            self.sft_warmup_steps > 0
        ):
            raise ValueError(
                "`sft_warmup_learning_rate` and `reset_optimizer_after_warmup` act on the SFT warm-up phase, but "
                "`sft_warmup_steps` is 0: set sft_warmup_steps > 0 or leave them at their defaults."
            )
        if (self.sft_warmup_learning_rate is not None or self.reset_optimizer_after_warmup) and not (
            isinstance(self.learning_rate, int | float) and self.learning_rate > 0
        ):
            raise ValueError(
                "`sft_warmup_learning_rate` / `reset_optimizer_after_warmup` build a two-phase schedule relative to "
                f"`learning_rate`, which must then be > 0; got {self.learning_rate!r}."
            )
        if self.sft_per_device_train_batch_size is not None and (
            not isinstance(self.sft_per_device_train_batch_size, int)
            or self.sft_per_device_train_batch_size < 1
        ):
            raise ValueError(
                "`sft_per_device_train_batch_size` must be None or an integer >= 1, "
                f"got {self.sft_per_device_train_batch_size!r}."
            )
        if self.max_sft_length is not None and (
            not isinstance(self.max_sft_length, int) or self.max_sft_length < 2
        ):
            raise ValueError(
                f"`max_sft_length` must be None or an integer >= 2, got {self.max_sft_length!r}."
            )
        # `use_liger_kernel=True` needs nothing here: in TRL 1.16 it only swaps the model's layer kernels (its fused
        # linear cross-entropy is refused by GRPOTrainer), and every loss, L_SFT and the meta step included, goes
        # through the same fused log-prob head as without it.

    def _warn_about_other_strategies_fields(self) -> None:
        """A field that only another strategy reads, set away from its default, is ignored: say so once."""
        active = get_strategy_class(self.balancing)
        own = set(active.config_fields)
        defaults = {f.name: f.default for f in fields(self)}
        ignored: dict[str, list[str]] = {}  # field -> the strategies that read it (a field may serve several)
        for name, cls in STRATEGIES.items():
            if cls is active:
                continue
            for f in cls.config_fields:
                if f not in own and getattr(self, f) != defaults[f]:
                    ignored.setdefault(f, []).append(name)
        if ignored:
            logger.warning(
                "AMFTConfig: balancing=%r does not read %s; those fields are ignored.",
                self.balancing,
                ", ".join(f"{f}={getattr(self, f)!r} ({', '.join(names)})" for f, names in ignored.items()),
            )

    @property
    def mu_is_fixed(self) -> bool:
        """True when `mu_min == mu_max` (balancing='amft'): mu cannot move, so neither controller term is computed."""
        return self.mu_min == self.mu_max

    @property
    def two_phase_schedule(self) -> bool:
        """Whether the warm-up gets a learning-rate schedule of its own (and the later phase a fresh one)."""
        return self.sft_warmup_learning_rate is not None or self.reset_optimizer_after_warmup


def check_optimizer_settings(args: Any, num_training_steps: int) -> None:
    """Build the optimizer and learning-rate schedule the Trainer will build from `args` (any `TrainingArguments`:
    `AMFTConfig`, TRL's `SFTConfig` / `GRPOConfig`), on a one-parameter probe, and raise a `ValueError` naming the
    settings when torch or transformers refuses them.

    `TrainingArguments` accepts values that torch's optimizers refuse only when the trainer builds them, after the
    model is loaded: a negative `learning_rate`, `weight_decay` or `adam_epsilon`, an `adam_beta1` / `adam_beta2`
    outside [0, 1), `optim_args` or `lr_scheduler_kwargs` the optimizer or schedule does not take. `AMFTConfig` runs
    this at construction, and `amft-compare` on every run's configs before the grid starts. With
    `sft_warmup_learning_rate` or `reset_optimizer_after_warmup` (`two_phase_schedule`), the schedule must also be a
    `LambdaLR` that `AMFTTrainer` can split into two phases.

    Only torch's and transformers' own optimizers are probed: those the Trainer builds from the model itself (GaLore,
    Apollo, LOMO, Muon...), from other packages (bitsandbytes, torchao) or from a package that is not installed are
    left to the trainer.
    """
    import torch
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import Trainer, get_scheduler

    try:
        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    except (
        Exception
    ):  # needs the model, or a package this machine lacks: the trainer says so when it builds it
        return
    if (
        not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer))
        or not optimizer_cls.__module__.startswith(
            ("torch.", "transformers.")
        )  # bitsandbytes, torchao...: on device
        or any(key in kwargs for key in ("params", "model", "optimizer_dict"))
    ):
        return
    kwargs = {k: v for k, v in kwargs.items() if k != "fused"}  # the probe is on CPU; fused changes no check
    probe = torch.nn.Linear(1, 1)
    groups = [
        {"params": [probe.weight], "weight_decay": args.weight_decay},
        {"params": [probe.bias], "weight_decay": 0.0},
    ]
    settings = (
        f"learning_rate={args.learning_rate!r}, weight_decay={args.weight_decay!r}, adam_beta1={args.adam_beta1!r}, "
        f"adam_beta2={args.adam_beta2!r}, adam_epsilon={args.adam_epsilon!r}"
        + (f", optim_args={args.optim_args!r}" if args.optim_args else "")
    )
    optim = getattr(args.optim, "value", args.optim)
    try:
        optimizer = optimizer_cls(groups, **kwargs)
    except (ValueError, TypeError, RuntimeError) as error:
        raise ValueError(
            f"the optimizer `optim={optim!r}` refuses these settings ({settings}): {error}"
        ) from None
    schedule = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    try:
        scheduler = get_scheduler(
            args.lr_scheduler_type,
            optimizer=optimizer,
            num_warmup_steps=args.get_warmup_steps(num_training_steps),
            num_training_steps=num_training_steps,
            scheduler_specific_kwargs=args.lr_scheduler_kwargs,
        )
    except (ValueError, TypeError, RuntimeError) as error:
        raise ValueError(
            f"the learning-rate schedule `lr_scheduler_type={schedule!r}` refuses its settings "
            f"(lr_scheduler_kwargs={args.lr_scheduler_kwargs!r}): {error}"
        ) from None
    if getattr(args, "two_phase_schedule", False) and not isinstance(scheduler, LambdaLR):
        raise ValueError(
            f"`lr_scheduler_type={schedule!r}` cannot be split into a warm-up phase and a later phase "
            "(sft_warmup_learning_rate / reset_optimizer_after_warmup need a LambdaLR schedule such as linear, "
            "cosine or constant)."
        )


def _bf16_accelerator_available() -> bool:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    for backend in ("xpu", "npu", "mlu", "musa", "hpu"):
        module = getattr(torch, backend, None)
        if module is not None and getattr(module, "is_available", lambda: False)():
            return True
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())
