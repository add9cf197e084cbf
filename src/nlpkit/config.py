"""THE schema: one pydantic model for every stage, each field checked on its own.

Reading recipe files, applying KEY=VALUE overrides and the rules that span sections (`validate_recipe`,
`check_recipe`): recipes/__init__.py. The wording of every problem: errors.py.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from nlpkit.errors import NlpkitError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(Section):
    name: str = "minilm"  # embedded alias (`nlpkit env` lists them), local directory, or hub id
    revision: str | None = None  # hub revision; ignored for local directories and aliases
    trust_remote_code: bool = False  # runs Python shipped with the model: only for models you trust
    allow_pickle: bool = False  # .bin/.pt weights can run code when loaded; safetensors only by default
    # Weights' dtype. auto: fp32 on the CPU (bf16 autocast does the fast part there); on a GPU, frozen weights (an
    # adapter's base, reference and reward models) in bf16 (fp16 where the GPU has none) and trained weights in fp32
    # under mixed-precision autocast. bfloat16 trains in pure bf16; float16 only for frozen bases (with an adapter).
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # auto: transformers' choice (sdpa where the model has it); flash_attention_2 needs a GPU and `pip install
    # flash-attn`.
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"


class DataSection(Section):
    train: str  # catalog name (sst2, ag_news, ...), file, folder, or hub id; "NAME:split" picks a split
    eval: str | None = None  # same forms; default: the catalog's eval split, else no evaluation
    mirror: str | None = None  # local copy of catalog datasets (default: $NLPKIT_DATA_DIR)
    text_column: str | None = None  # default: the catalog's, else text/sentence/content/review
    text_pair_column: str | None = None  # second segment for pair tasks (NLI, QA relevance)
    label_column: str | None = None  # default: the catalog's, else label/labels
    label_names: dict[str, str] | None = None  # raw label value -> display name, e.g. {"0": negative}
    problem_type: Literal["auto", "single_label", "multi_label", "regression"] = "auto"
    max_length: int = Field(128, gt=0)  # tokens; longer inputs are truncated
    max_train_samples: int | None = Field(None, gt=0)  # seeded random subset, for quick runs
    max_eval_samples: int | None = Field(None, gt=0)
    # sft: how rows become conversations; auto detects from the columns (docs/sft.md).
    format: Literal["auto", "alpaca", "messages", "prompt_completion", "text", "code"] = "auto"
    chat_template: str | None = None  # sft: a Jinja chat template (or a file holding one); default: the model's

    @field_validator("label_names", mode="before")
    @classmethod
    def _label_keys_as_text(cls, value):
        # YAML reads `{0: negative}` with int keys; labels are matched as text ("0"), as in the data files.
        return {str(k): v for k, v in value.items()} if isinstance(value, dict) else value


class TrainSection(Section):
    # Names copy transformers.TrainingArguments so what users know carries over.
    learning_rate: float = Field(5e-5, gt=0)
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = -1  # > 0 overrides num_train_epochs
    per_device_train_batch_size: int = Field(32, gt=0)
    # Instead of the per-device batch: the batch of one optimizer step over all processes. The per-device batch is
    # then global / (processes x gradient_accumulation_steps), so a recipe trains the same on 1 or 8 processes.
    global_batch_size: int | None = Field(None, gt=0)
    per_device_eval_batch_size: int = Field(64, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: float = Field(0.06, ge=0)  # < 1 is a fraction of all steps (transformers 5 semantics)
    lr_scheduler_type: str = "linear"
    seed: int = 42
    # bf16 autocast: "auto" turns it on where the hardware runs bf16 fast (CUDA with bf16, CPUs with avx512_bf16/AMX).
    bf16: Literal["auto"] | bool = "auto"
    # group_by_length batches similar lengths together: with dynamic padding, far less padding computed.
    train_sampling_strategy: Literal["random", "sequential", "group_by_length"] = "group_by_length"
    logging_steps: int = Field(50, gt=0)
    eval_strategy: Literal["no", "steps", "epoch"] = "epoch"
    eval_steps: int | None = Field(None, gt=0)
    save_strategy: Literal["no", "steps", "epoch"] = "epoch"
    save_steps: int | None = Field(None, gt=0)
    save_total_limit: int | None = Field(1, gt=0)
    completion_only: bool = True  # sft: loss on the answer (and its EOS) only; false trains on the prompt too
    packing: bool = False  # sft: pack examples into full-length rows (faster, mixes examples in one row)
    # NaN/inf gradients or a loss stuck at exactly 0: stop (exit 3, last good checkpoint kept) or only warn.
    watchdog: Literal["stop", "warn"] = "stop"
    # Experiment trackers (transformers' integrations), local/offline unless you point them elsewhere (docs/outside.md).
    report_to: list[Literal["tensorboard", "mlflow", "wandb", "trackio"]] = ["tensorboard"]
    # Other TrainingArguments fields, passed through as they are; names are checked against the class.
    extra: dict[str, Any] = Field(default_factory=dict)

    def per_device_batch(self, processes: int) -> int:
        if self.global_batch_size is None:
            return self.per_device_train_batch_size
        per_step = processes * self.gradient_accumulation_steps
        if self.global_batch_size % per_step:
            raise NlpkitError(
                f"train.global_batch_size {self.global_batch_size}: does not divide into {processes} process(es) x "
                f"{self.gradient_accumulation_steps} accumulation step(s); use a multiple of {per_step}")
        return self.global_batch_size // per_step


class PeftSection(Section):
    # Names copy peft's configs (LoraConfig.r, lora_alpha -> alpha, lora_dropout -> dropout).
    method: Literal["lora", "ia3", "prefix_tuning", "prompt_tuning"] = "lora"
    r: int = Field(8, gt=0)  # LoRA rank: higher = more capacity and memory
    alpha: float = Field(16, gt=0)  # LoRA scale is alpha / r (alpha / sqrt(r) with use_rslora)
    dropout: float = Field(0.05, ge=0, lt=1)
    # Default "all-linear": every attention and MLP linear layer (never the output head).
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    modules_to_save: list[str] = Field(default_factory=list)  # trained in full and saved; a classifier head always is
    use_dora: bool = False  # weight-decomposed LoRA
    use_rslora: bool = False  # rank-stabilised scale alpha / sqrt(r)
    num_virtual_tokens: int = Field(20, gt=0)  # prefix_tuning and prompt_tuning


PROMPT_METHODS = ("prefix_tuning", "prompt_tuning")


class QuantSection(Section):
    # bitsandbytes loading; names copy BitsAndBytesConfig (bnb_4bit_quant_type -> quant_type, ...).
    bits: Literal[4, 8]
    quant_type: Literal["nf4", "fp4"] = "nf4"  # 4-bit only
    double_quant: bool = True  # 4-bit only: quantize the quantization constants too (~0.4 bit/param saved)
    compute_dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"  # 4-bit matmuls; fp16 is slow on CPU


class GenerationSection(Section):
    max_new_tokens: int = Field(256, gt=0)  # end-of-run samples, `nlpkit chat`
    eos_check_prompts: int = Field(50, ge=0)  # held prompts generated after sft to measure the EOS stop rate
    # sft on answers ending in "#### <number>" (GSM8K): held questions answered before and after training, scored
    # by exact match of that number (metrics exact_match_base, exact_match). 0 = off.
    exact_match_prompts: int = Field(0, ge=0)
    # N > 0 forbids repeating any N-token sequence: a small tuned model decoding greedily can loop and never reach
    # EOS. (A repetition_penalty does worse: it also penalises the EOS token, which the chat template puts in every
    # prompt.) Saved in the run's generation config, so `nlpkit chat` and `serve` answer as the end-of-run check did.
    no_repeat_ngram_size: int = Field(0, ge=0)


class RewardSection(Section):
    """Where rlhf scores come from: a reward model, functions of the text, or both (summed)."""

    model: str | None = None  # a `stage: reward` run directory (a sequence classifier with num_labels=1)
    # Python callables "module:function" or "path/to/file.py:function", or a shipped name (nlpkit/rewards.py:
    # gsm8k_exact_match, unit_test_pass, unit_test_fraction, compiles), called as f(prompts, completions) -> floats;
    # their weighted values are added to the model's score.
    function: list[str] = Field(default_factory=list)
    # One number multiplies every function's reward; a list gives each function its own weight, in order (partial
    # credit: [1.0, 0.2] for unit_test_fraction and compiles).
    function_weight: float | list[float] = 1.0
    # How the reward model sees a prompt: the text it was trained on precedes the completion (HH: "\n\nHuman: ...").
    prompt_template: str = "{prompt}"

    @field_validator("function", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("prompt_template")
    @classmethod
    def _fills_with_the_prompt(cls, value):
        try:  # refused here, not after the models have loaded
            filled = value.format(prompt="\0")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"{value!r} cannot be filled ({type(e).__name__}: {e}); the only field it may name is "
                             "{prompt}; write {{ and }} for literal braces") from None
        if "\0" not in filled:
            raise ValueError(f"{value!r} has no {{prompt}} field, so the reward model would never see the prompt")
        return value


class PPOSection(Section):
    # Names copy trl's PPOConfig (trl <= 1.12); defaults as docs/ppo-checklist.md gives them unless a comment says why.
    total_episodes: int = Field(512, gt=0)  # prompts sampled in all; updates = ceil(total_episodes / batch_size)
    batch_size: int = Field(16, gt=0)  # episodes per rollout (one update)
    num_mini_batches: int = Field(2, gt=0)  # optimiser steps per PPO epoch; must divide batch_size
    num_ppo_epochs: int = Field(4, gt=0)  # passes over each rollout, a fresh permutation each
    response_length: int = Field(53, gt=0)  # max_new_tokens, exactly
    temperature: float = Field(0.7, gt=0)
    kl_coef: float = Field(0.05, ge=0)  # the starting value when kl_target is set
    # Adaptive KL (Ziegler et al.): kl_coef is adjusted after every update towards a KL of kl_target nats per
    # response, by at most a factor 1 +- 0.2 * batch_size / kl_horizon per update. null = a fixed kl_coef.
    kl_target: float | None = Field(None, gt=0)
    kl_horizon: int = Field(10000, gt=0)  # episodes; larger = slower adaptation (TRL's old default)
    kl_estimator: Literal["k1", "k3"] = "k1"  # k1 in the reward is unbiased; k3 is >= 0 per token
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    whiten_rewards: bool = False
    missing_eos_penalty: float | None = 1.0  # subtracted from the score of responses with no stop token; null = off
    # Subtract the mean score of the reference policy's responses to this many training prompts (sampled as in the
    # rollout, once before training), so reference responses average 0 (N+). 0 = off: scores as the reward gives them.
    reward_baseline_prompts: int = Field(0, ge=0)
    reward_clip: float | None = Field(None, gt=0)  # scores clipped to [-reward_clip, reward_clip] (OpenRLHF: 10)
    # Clip the gradient norm of policy and value together before each optimiser step (OpenRLHF: 1.0). null = no
    # clipping, as trl's PPOTrainer (which ignores TrainingArguments.max_grad_norm).
    max_grad_norm: float | None = Field(None, gt=0)
    stop_token: str | None = None  # default: the policy tokenizer's EOS
    value_model: str | None = None  # default: the reward model (reward.model), else the policy base with a new head
    num_sample_generations: int = Field(10, ge=0)  # times a table of prompts and responses is logged over the run
    # Held-out prompts scored greedily before and after training (0 = skip); with data.eval, that file's first N
    # prompts (0 = all of them).
    eval_prompts: int = Field(0, ge=0)
    # The watchdog (train.watchdog: stop or warn): a KL to the reference above max_kl nats per response, or a mean
    # per-token policy entropy below min_entropy, means the policy ran away or collapsed. null turns a check off.
    max_kl: float | None = Field(30.0, gt=0)
    min_entropy: float | None = Field(0.01, ge=0)

    def episodes_per_process(self, processes: int, accumulation: int) -> int:
        """batch_size is an update's episodes over all processes, so a recipe trains the same on 1 or N. Each
        process splits its share of a minibatch into `accumulation` equal micro-batches."""
        per_process = self.batch_size // processes
        if self.batch_size % processes or per_process % (self.num_mini_batches * accumulation):
            raise NlpkitError(f"ppo.batch_size {self.batch_size}: must split into {processes} process(es) x "
                              f"ppo.num_mini_batches={self.num_mini_batches} equal minibatches x "
                              f"train.gradient_accumulation_steps={accumulation}; use a multiple of "
                              f"{processes * self.num_mini_batches * accumulation}")
        return per_process


class GRPOSection(Section):
    # algo grpo / rloo (trl's GRPOTrainer / RLOOTrainer); names copy GRPOConfig. Steps and batch come from train:
    # train.max_steps, train.per_device_train_batch_size (completions per step, a multiple of num_generations).
    num_generations: int = Field(8, ge=2)  # completions per prompt, compared within their group
    max_completion_length: int = Field(64, gt=0)
    temperature: float = Field(0.7, gt=0)
    beta: float = Field(0.04, gt=0)  # KL to the reference; trl's GRPO default is 0 (no reference at all)


# stage -> trl's loss_type names (tests/test_dpo.py checks them against trl); simpo is CPO with loss_type simpo.
LOSS_TYPES = {"dpo": ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                      "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"),
              "kto": ("kto", "apo_zero_unpaired"), "orpo": (), "simpo": ("simpo",)}
PREFERENCE_STAGES = tuple(LOSS_TYPES)  # trl's preference trainers, all in stages/dpo.py (docs/preference.md)


class DPOSection(Section):
    # Names copy DPOConfig; other fields of the stage's trl config (label_smoothing, loss_weights, desirable_weight,
    # simpo_gamma, ...) pass through train.extra, checked by name. loss_type default: the trainer's (sigmoid, kto, simpo).
    loss_type: str | list[str] | None = None  # dpo: a list is summed (weights: train.extra.loss_weights)
    beta: float = Field(0.1, gt=0)  # higher = closer to the reference; orpo: the odds-ratio weight (lambda)
    # Reference log-probs computed once before training: no reference model held while training (full fine-tuning).
    precompute_ref_log_probs: bool = False
    # Held-out answers, as ppo.eval_prompts: N prompts of the prompt file `prompts` (the N that an rlhf recipe on the
    # same file and train.seed holds out), answered greedily with at most response_length tokens by the start model
    # and the trained one; with score_with, scored by that reward model (a run directory, or a reward: section for
    # its prompt_template); KL to the start model, EOS rate, length and refusal rate (nlpkit/heldout.py).
    eval_prompts: int = Field(0, ge=0)
    prompts: str | None = None
    score_with: RewardSection | None = None
    response_length: int = Field(48, gt=0)

    @field_validator("score_with", mode="before")
    @classmethod
    def _run_dir(cls, value):
        return {"model": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _prompts_for_answers(self):
        if self.eval_prompts and self.prompts is None:
            raise ValueError("dpo.eval_prompts needs dpo.prompts: a prompt file or catalog name (ppo_prompts)")
        return self


class Recipe(Section):
    stage: Literal["classify", "sft", "reward", "rlhf", "dpo", "kto", "orpo", "simpo"]
    # rlhf: ppo is nlpkit's own loop (the ppo: section); grpo and rloo run trl's trainers (the grpo: section).
    algo: Literal["ppo", "grpo", "rloo"] = "ppo"
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    peft: PeftSection | None = None  # absent: full fine-tuning
    quant: QuantSection | None = None  # absent: full precision
    generation: GenerationSection = Field(default_factory=GenerationSection)
    reward: RewardSection | None = None  # rlhf: where scores come from
    ppo: PPOSection | None = None  # rlhf: PPO settings (absent = defaults)
    grpo: GRPOSection | None = None  # rlhf with algo grpo or rloo (absent = defaults)
    dpo: DPOSection | None = None  # dpo, kto, orpo, simpo (absent = defaults)
