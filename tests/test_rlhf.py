"""nlpkit's PPO on the offline toy of docs/ppo-checklist.md: a tiny policy learns to say "positive" words for a reward model trained on
synthetic preferences. Plus the checklist items that need a model (numbers in brackets)."""

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from conftest import POSITIVE, write_toy_prompts
from helpers import nlpkit

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rlhf_recipe(tmp_path, policy, reward_model, lora=False, **ppo) -> str:
    raw = {
        "stage": "rlhf",
        "model": {"name": str(policy)},
        "data": {"train": str(write_toy_prompts(tmp_path / "prompts.jsonl", 300, seed=3)), "max_length": 16},
        "reward": {"model": str(reward_model)},
        "ppo": {"total_episodes": 480, "batch_size": 16, "num_mini_batches": 2, "num_ppo_epochs": 4,
                "response_length": 12, "temperature": 0.7, "kl_coef": 0.05, "missing_eos_penalty": 1.0,
                "num_sample_generations": 3, "eval_prompts": 32, **ppo},
        "train": {"learning_rate": 3e-4, "seed": 0, "bf16": False, "weight_decay": 0.0},
    }
    if lora:
        raw["peft"] = {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0}
    path = tmp_path / "rlhf.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def read_log(run) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_ppo_toy_learns_positive_words_within_a_kl_budget(tmp_path, toy_llama, toy_reward_model):
    run = tmp_path / "ppo"
    result = nlpkit("rlhf", rlhf_recipe(tmp_path, toy_llama, toy_reward_model), "--output-dir", run, "--json")
    assert result.code == 0, result.stderr
    log = read_log(run)
    assert len(log) == 30 and log[-1]["episode"] == 480  # [23] ceil(480 / 16) updates
    scores = [entry["objective/scores"] for entry in log]
    assert sum(scores[-5:]) / 5 >= sum(scores[:5]) / 5 + 1.0, scores  # docs/ppo-checklist.md's suggested CI assertion
    assert log[-1]["objective/kl"] > 0
    # [22] the learning rate decays linearly, one step per update
    assert [entry["lr"] for entry in log] == pytest.approx([3e-4 * (1 - k / 30) for k in range(1, 31)])
    for entry in log:
        assert entry["policy/approxkl_avg"] < 0.05
        assert 0 <= entry["policy/clipfrac_avg"] <= 1 and 0 <= entry["val/clipfrac_avg"] <= 1  # [27]
        assert entry["policy/first_minibatch_ratio_max_dev"] < 1e-3  # [5] ratio = 1 before the first step
        # [9] the penalty shifts exactly the responses without EOS
        missing = 16 - entry["val/num_eos_tokens"]
        assert entry["objective/scores"] == pytest.approx(entry["objective/scores_without_penalty"] - missing / 16,
                                                          abs=1e-5)
    metrics = result.json()
    for key in ("eval_score_before", "eval_score_after", "eval_score_gain", "objective/kl"):
        assert key in metrics
    assert metrics["eval_score_gain"] == pytest.approx(metrics["eval_score_after"] - metrics["eval_score_before"])
    # the held-out answers, both of them for each prompt, with the KL of the trained policy to the reference
    answers = [json.loads(line) for line in (run / "heldout.jsonl").read_text().splitlines()]
    assert len(answers) == metrics["eval_prompts"] == 32
    assert sum(a["score_after"] for a in answers) / 32 == pytest.approx(metrics["eval_score_after"], abs=1e-5)
    assert all(a["kl_after"] >= 0 for a in answers) and metrics["eval_kl_after"] > 0 and "kl_before" not in answers[0]
    assert metrics["eval_refusal_rate_before"] == metrics["eval_refusal_rate_after"] == 0  # no refusals in the toy
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert {s["update"] for s in samples} >= {1, 30}
    late = " ".join(s["response"] for s in samples if s["update"] == 30).split()
    assert sum(word in POSITIVE for word in late) / max(1, len(late)) > 0.3  # chance is 10 / 43 words
    assert (run / "model.safetensors").is_file() and (run / "nlpkit_run.json").is_file()


@pytest.mark.parametrize("bf16", [False, True])  # True: the frozen bases are held in bf16, the adapters in fp32
def test_lora_policy_starts_at_the_reference_and_saves_only_the_adapter(bf16, tmp_path, toy_llama, toy_reward_model):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    run = tmp_path / "ppo-lora"
    recipe = rlhf_recipe(tmp_path, toy_llama, toy_reward_model, lora=True, total_episodes=48, eval_prompts=0)
    result = nlpkit("rlhf", recipe, f"train.bf16={str(bf16).lower()}", "--output-dir", run, "--json")
    assert result.code == 0, result.stderr
    log = read_log(run)
    assert log[0]["objective/kl"] == 0.0  # [26] LoRA B = 0: the policy IS the reference at step 0
    assert log[-1]["objective/kl"] != 0.0  # and it moved after training
    assert (run / "adapter_config.json").is_file() and not (run / "model.safetensors").exists()  # [25] policy only
    assert {str(w.dtype) for w in load_file(run / "adapter_model.safetensors").values()} == {"torch.float32"}
    # data.max_length caps the prompts while training; the saved tokenizer keeps the model's own limit
    assert AutoTokenizer.from_pretrained(run).model_max_length == AutoTokenizer.from_pretrained(toy_llama).model_max_length


def test_a_long_prompt_keeps_its_last_tokens(toy_llama):  # [2]: data.max_length, cut on the left
    from transformers import AutoTokenizer

    from nlpkit.ppo.rollout import encode_prompts

    tokenizer = AutoTokenizer.from_pretrained(toy_llama, padding_side="left", truncation_side="left")
    prompts = ["the cat sits and a dog runs and one bird sings", "two fish"]
    full = encode_prompts(tokenizer, prompts, "cpu")
    tokenizer.model_max_length = 4
    cut = encode_prompts(tokenizer, prompts, "cpu")
    assert full.shape[1] > 4 and cut.shape[1] == 4
    assert cut[0].tolist() == full[0, -4:].tolist()


def test_one_update_changes_the_policy_and_value_but_never_the_reference(tmp_path, toy_llama, toy_reward_model):
    """[3, 11, 25] with a full-weight policy and a separate frozen reference, through the loop's own functions. The
    policy has attention dropout 0.5 (a config rate, not an nn.Dropout): in train mode the first ratio would be off."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nlpkit.recipes import load_recipe
    from nlpkit.ppo import core
    from nlpkit.ppo.rollout import episode_seeds, make_rollout
    from nlpkit.ppo.update import train_on_rollout
    from nlpkit.scoring import Scorer
    from nlpkit.stages.ppo import load_value_model

    cfg = load_recipe(rlhf_recipe(tmp_path, toy_llama, toy_reward_model))
    tokenizer = AutoTokenizer.from_pretrained(toy_llama, padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(toy_llama, attention_dropout=0.5)
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    scorer = Scorer(cfg.reward, False, torch.device("cpu"))
    value = load_value_model(cfg, cfg.ppo, tokenizer, scorer)
    rm_weights = scorer.model.state_dict()
    assert all(torch.equal(v, rm_weights[k]) for k, v in value.state_dict().items())  # [24] value starts as the RM
    assert value is not scorer.model  # a separate network
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    policy_before = {k: v.clone() for k, v in policy.state_dict().items()}
    value_before = {k: v.clone() for k, v in value.state_dict().items()}
    optimizer = torch.optim.AdamW([*policy.parameters(), *value.parameters()], lr=1e-3)
    batch = [{"prompt": "the cat sits"}, {"prompt": "a dog runs"}] * 8
    rollout = make_rollout(policy, reference, value, tokenizer, scorer, batch, episode_seeds(0, 1, range(16)),
                           cfg.ppo, [tokenizer.eos_token_id], False, torch.device("cpu"))
    assert rollout["stats"]["objective/kl"] == 0.0  # identical weights: k1 is exactly 0 [12]
    # values and log-probs hold their sentinels after the end [15]
    assert (rollout["values"][rollout["pad_mask"]] == 0).all()
    assert (rollout["logprobs"][rollout["pad_mask"]] == core.INVALID_LOGPROB).all()
    assert (rollout["advantages"][rollout["pad_mask"]] == 0).all()
    stats = train_on_rollout(policy, value, optimizer, rollout, cfg.ppo, 1, torch.Generator().manual_seed(0), False)
    assert stats["policy/first_minibatch_ratio_max_dev"] < 1e-3  # [5]
    assert all(torch.equal(v, before[k]) for k, v in reference.state_dict().items())  # [11] unchanged
    assert not any(p.requires_grad for p in reference.parameters())
    assert all(not torch.equal(v, policy_before[k]) for k, v in policy.state_dict().items())  # every weight moved
    assert all(not torch.equal(v, value_before[k]) for k, v in value.state_dict().items())


def test_every_response_is_scored_at_an_eos_even_one_cut_by_the_window(tmp_path, toy_llama, toy_reward_model):
    """[8, 9] the reward model was trained with the score at the EOS: a response with no stop token (cut at
    response_length) is scored with the EOS appended, not at its last token, and the penalty alone marks it."""
    import torch

    from nlpkit.recipes import load_recipe
    from nlpkit.scoring import Scorer, score_ids

    scorer = Scorer(load_recipe(rlhf_recipe(tmp_path, toy_llama, toy_reward_model)).reward, False, torch.device("cpu"))
    text = "the cat sits good great"
    ids = scorer.tokenizer(text)["input_ids"]
    tokenizer = scorer.tokenizer
    at_eos, at_last = score_ids(scorer.model, [ids + [tokenizer.eos_token_id], ids], tokenizer.pad_token_id, False)
    assert at_eos != at_last
    assert scorer.score([{"prompt": "the cat sits"}], [" good great"]) == pytest.approx([at_eos], abs=1e-5)


def test_a_reply_is_scored_as_the_loop_decodes_it_with_the_space_the_reward_model_was_trained_on(
        tmp_path, toy_llama, toy_reward_model):
    """The reward model trained on prompt + " reply"; the loop decodes the reply from the policy's ids. Decoded
    alone (and stripped), "good great" joined "the cat sits" as "sitsgood", one unknown word: the scorer must see
    exactly the text it was trained on."""
    import torch
    from transformers import AutoTokenizer

    from nlpkit.ppo import core
    from nlpkit.ppo.rollout import decode_responses, encode_prompts
    from nlpkit.recipes import load_recipe
    from nlpkit.scoring import Scorer, score_ids

    policy_tokenizer = AutoTokenizer.from_pretrained(toy_llama)
    policy_tokenizer.padding_side = "left"
    queries = encode_prompts(policy_tokenizer, ["the cat sits", "a dog"], torch.device("cpu"))
    responses = torch.tensor([policy_tokenizer("good great <eos> <pad>")["input_ids"],
                              policy_tokenizer("happy <eos> <pad> <pad>")["input_ids"]])
    ends, has_stop = core.end_indices(responses, [policy_tokenizer.eos_token_id])
    completions = decode_responses(policy_tokenizer, queries, responses, ends, has_stop)
    assert completions == [" good great", " happy"]

    scorer = Scorer(load_recipe(rlhf_recipe(tmp_path, toy_llama, toy_reward_model)).reward, False, torch.device("cpu"))
    tokenizer = scorer.tokenizer
    expected = score_ids(scorer.model, [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
                                        for text in ("the cat sits good great", "a dog happy")],
                         tokenizer.pad_token_id, False)
    assert scorer.score([{"prompt": "the cat sits"}, {"prompt": "a dog"}], completions) == pytest.approx(expected,
                                                                                                         abs=1e-5)


@pytest.mark.parametrize("bf16", [False, True])
def test_with_lora_the_value_model_is_an_adapter_on_the_reward_model_which_keeps_scoring_unchanged(
        bf16, tmp_path, toy_llama, toy_reward_model):
    """[24] with peft: one reward model in memory. The value starts as the reward model, trains only its adapter and
    its own copy of the score head, and the scores the reward model gives stay exactly what they were."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nlpkit.adapters import apply_peft
    from nlpkit.recipes import load_recipe
    from nlpkit.models import autocast
    from nlpkit.ppo.rollout import episode_seeds, make_rollout
    from nlpkit.ppo.update import train_on_rollout
    from nlpkit.scoring import Scorer
    from nlpkit.stages.ppo import load_value_model

    cfg = load_recipe(rlhf_recipe(tmp_path, toy_llama, toy_reward_model, lora=True))
    tokenizer = AutoTokenizer.from_pretrained(toy_llama, padding_side="left")
    policy = apply_peft(AutoModelForCausalLM.from_pretrained(toy_llama), cfg.peft, task_type="CAUSAL_LM")
    scorer = Scorer(cfg.reward, bf16, torch.device("cpu"))
    batch = [{"prompt": "the cat sits"}, {"prompt": "a dog runs"}] * 8
    completions = ["good great happy", "sad the a"] * 8
    scores_before = scorer.score(batch, completions)
    base_rm = scorer.model
    ids = tokenizer(["the cat sits good"], return_tensors="pt")["input_ids"]
    with torch.no_grad(), autocast(bf16, torch.device("cpu")):
        reward_logits = base_rm(input_ids=ids).logits
    value = load_value_model(cfg, cfg.ppo, tokenizer, scorer)
    assert value.get_base_model() is base_rm  # shared, not copied
    trainable = {name: p.dtype for name, p in value.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or ".score.modules_to_save." in name for name in trainable), trainable
    assert set(trainable.values()) == {torch.float32}  # over a bf16 base too
    assert {p.dtype for p in base_rm.parameters() if not p.requires_grad} == {torch.bfloat16 if bf16 else torch.float32}
    with torch.no_grad(), autocast(bf16, torch.device("cpu")):  # [24] the value head starts as the reward head
        assert torch.equal(value(input_ids=ids).logits, reward_logits)
    rollout = make_rollout(policy, None, value, tokenizer, scorer, batch, episode_seeds(0, 1, range(16)), cfg.ppo,
                           [tokenizer.eos_token_id], bf16, torch.device("cpu"))
    optimizer = torch.optim.AdamW([p for m in (policy, value) for p in m.parameters() if p.requires_grad], lr=1e-2)
    train_on_rollout(policy, value, optimizer, rollout, cfg.ppo, 1, torch.Generator().manual_seed(0), bf16)
    with torch.no_grad(), autocast(bf16, torch.device("cpu")):
        assert not torch.allclose(value(input_ids=ids).logits, reward_logits)  # the value moved
    # Bit-identity is the claim: the value adapter is disabled while scoring, so the reward model is untouched.
    assert scorer.score(batch, completions) == scores_before  # the reward did not


def test_reward_function_alone_drives_ppo(tmp_path, toy_llama, monkeypatch):
    """reward.function without a reward model: the value model starts from the policy's base with a new head."""
    module = tmp_path / "count_reward.py"
    module.write_text(f"POSITIVE = set({POSITIVE!r})\n"
                      "def positive_words(prompts, completions, **_):\n"
                      "    return [float(sum(w in POSITIVE for w in c.split())) for c in completions]\n")
    path = rlhf_recipe(tmp_path, toy_llama, None, total_episodes=32, eval_prompts=8)
    recipe = yaml.safe_load(Path(path).read_text())
    recipe["reward"] = {"function": f"{module}:positive_words"}
    recipe["train"]["report_to"] = ["tensorboard", "mlflow"] if importlib.util.find_spec("mlflow") else ["tensorboard"]
    (tmp_path / "fn.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # MLflow's default store: mlflow.db here
    result = nlpkit("rlhf", tmp_path / "fn.yaml", "--output-dir", tmp_path / "run", "--json")
    assert result.code == 0, result.stderr
    log = read_log(tmp_path / "run")
    assert len(log) == 2 and all(entry["objective/scores_without_penalty"] >= 0 for entry in log)

    # train.report_to reaches our own loop too: every update's statistics, as in train_log.jsonl
    from test_report import tensorboard_scalars

    kl = [entry["objective/kl"] for entry in log]
    assert tensorboard_scalars(tmp_path / "run" / "tensorboard")["objective/kl"] == pytest.approx(kl, rel=1e-5)
    if "mlflow" in recipe["train"]["report_to"]:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
        run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
        params = run.data.params  # the resolved recipe, flattened
        assert params["ppo.total_episodes"] == "32" and "count_reward.py:positive_words" in params["reward.function"]
        history = client.get_metric_history(run.info.run_id, "objective/kl")
        assert [m.step for m in history] == [1, 2] and [m.value for m in history] == pytest.approx(kl, rel=1e-5)


def grpo_recipe(tmp_path, policy, algo: str, **train) -> Path:
    """3 steps of trl's GRPO/RLOO on 8 gsm8k-style questions: LoRA, beta > 0, exact match as the reward."""
    data = tmp_path / "math.jsonl"
    data.write_text("".join(f'{{"question": "What is {i} + 1?", "answer": "#### {i + 1}"}}\n' for i in range(8)))
    recipe = {
        "stage": "rlhf", "algo": algo,
        "model": {"name": str(policy)},
        "data": {"train": str(data)},
        "reward": {"function": "nlpkit.rewards:gsm8k_exact_match"},
        "peft": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "grpo": {"num_generations": 4, "max_completion_length": 8, "beta": 0.04},
        "train": {"max_steps": 3, "per_device_train_batch_size": 8, "logging_steps": 1, "save_strategy": "no",
                  "learning_rate": 1e-3, **train},
    }
    (tmp_path / f"{algo}.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path / f"{algo}.yaml"


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_trl_algorithms_run_with_our_scoring_and_log_the_reward_every_step(algo, tmp_path, tiny_llama):
    """algo grpo/rloo: trl's trainers, a LoRA policy loaded from its path, beta > 0, a reward function."""
    result = nlpkit("rlhf", grpo_recipe(tmp_path, tiny_llama, algo, bf16=False), "--output-dir", tmp_path / "run",
                    "--json")
    assert result.code == 0, result.stderr
    steps = [entry for entry in read_log(tmp_path / "run") if "reward" in entry]
    assert [entry["step"] for entry in steps] == [1, 2, 3]  # the reward is logged every step
    assert all(0.0 <= entry["reward"] <= 1.0 for entry in steps)  # exact match is 0 or 1
    assert all("kl" in entry for entry in steps)  # beta > 0: a reference model and a KL term
    assert (tmp_path / "run" / "adapter_config.json").is_file()
    merged = nlpkit("merge", tmp_path / "run", "--json")  # the run loads: its config.json is saved beside the adapter
    assert merged.code == 0, merged.stderr


# ---------------------------------------------------------------------------------------------- rewards computed by code


def test_gsm8k_exact_match_compares_the_number_after_the_marks():
    from nlpkit.rewards import gsm8k_exact_match

    answer = "She sells 16 - 3 - 4 = 9 eggs.\n#### 18"
    completions = ["9 * 2 = 18\n#### 18", "#### 18.0", "The answer is 18", "#### 1,800", "#### 17"]
    assert gsm8k_exact_match(["q"] * 5, completions, answer=[answer] * 5) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert gsm8k_exact_match(["q"], ["#### 1,000"], answer=["#### 1000"]) == [1.0]


def test_unit_test_reward_runs_code_in_a_subprocess_with_a_timeout_and_no_network():
    from nlpkit.rewards import unit_test_pass

    tests = "assert add(2, 3) == 5"
    completions = [
        "```python\ndef add(a, b):\n    return a + b\n```",  # passes
        "def add(a, b):\n    return a - b",  # wrong
        "def add(a, b):\n    while True: pass",  # hangs: killed by the timeout
        # creating a socket needs no network, so only the sandbox can make it fail: add() is right only if it did
        ("import socket\ntry:\n    socket.socket()\n    blocked = False\nexcept OSError:\n    blocked = True\n"
         "def add(a, b):\n    return a + b if blocked else 0"),
    ]
    assert unit_test_pass(["p"] * 4, completions, tests=[tests] * 4, timeout=2.0) == [1.0, 0.0, 0.0, 1.0]


def test_gsm8k_prompts_pass_their_answer_column_to_the_reward(tmp_path, tiny_llama):
    """The prompt rows' other columns reach reward functions as keywords (gsm8k's `answer`)."""
    import torch

    from nlpkit.recipes import validate_recipe
    from nlpkit.data import open_source, prompt_records
    from nlpkit.scoring import Scorer

    data = tmp_path / "gsm.jsonl"
    data.write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    cfg = validate_recipe({"stage": "rlhf", "model": {"name": str(tiny_llama)}, "data": {"train": str(data)},
                           "reward": {"function": "nlpkit.rewards:gsm8k_exact_match"}})
    scorer = Scorer(cfg.reward, False, torch.device("cpu"))
    records = prompt_records(open_source(str(data), "train", "data.train"), "question")
    assert records == [{"prompt": "1+1?", "answer": "#### 2"}]
    assert scorer.score(records * 2, ["so #### 2", "#### 3"]) == [1.0, 0.0]


def test_ppo_scores_code_prompts_by_every_assert_with_the_recipes_weights(tmp_path, tiny_llama):
    """rlhf-mbpp-ppo's scoring: a code set's hidden asserts reach unit_test_fraction, weighted with compiles."""
    import torch

    from conftest import write_code_problems
    from nlpkit.data import open_source, prompt_column, prompt_records
    from nlpkit.recipes import validate_recipe
    from nlpkit.scoring import Scorer

    cfg = validate_recipe({"stage": "rlhf", "model": {"name": str(tiny_llama)}, "data": {"train": "code.jsonl"},
                           "reward": {"function": ["unit_test_fraction", "compiles"], "function_weight": [1.0, 0.2]}})
    rows = open_source(str(write_code_problems(tmp_path / "code.jsonl")), "train", "data.train")
    add = prompt_records(rows, prompt_column(rows, None))[0]  # shows one assert of three
    completions = ["```python\ndef add(a, b):\n    return a + b\n```",  # passes all three
                   "```python\ndef add(a, b):\n    return a + b + (a == 1)\n```",  # fails add(1, 1) == 2 only
                   "```python\ndef plus(a, b):\n    return a + b\n```",  # parses, but not the tested name
                   "add = lambda"]  # does not parse
    scores = Scorer(cfg.reward, False, torch.device("cpu")).score([add] * 4, completions)
    assert scores == pytest.approx([1.2, 2 / 3 + 0.2, 0.0, 0.0])


def test_rollout_samples_exactly_the_configured_window_with_no_logits_processor():  # [4]
    import torch

    from nlpkit.config import PPOSection
    from nlpkit.ppo.rollout import GumbelSampler, sample

    class Recorder:
        def generate(self, input_ids, **kwargs):
            self.kwargs = kwargs
            return torch.cat([input_ids, torch.full((len(input_ids), 3), 7)], 1)  # stopped early: 3 of 5 tokens

    class Tok:
        pad_token_id = 0

    policy = Recorder()
    responses = sample(policy, Tok(), torch.tensor([[0, 4, 5], [3, 4, 5]]), [11, 12],
                       PPOSection(response_length=5, temperature=0.7), [2])
    assert responses.tolist() == [[7, 7, 7, 0, 0], [7, 7, 7, 0, 0]]  # padded to exactly response_length
    kwargs = policy.kwargs
    # the Gumbel noise and the argmax sample; no top_k, top_p or temperature warper of generate's own
    assert kwargs["do_sample"] is False and kwargs["num_beams"] == 1
    assert not {"top_k", "top_p", "temperature"} & kwargs.keys()
    [sampler] = kwargs["logits_processor"]
    assert isinstance(sampler, GumbelSampler) and sampler.seeds == [11, 12] and sampler.temperature == 0.7
    assert kwargs["max_new_tokens"] == 5 and kwargs["repetition_penalty"] == 1.0
    assert kwargs["no_repeat_ngram_size"] == 0
    assert kwargs["attention_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]  # [2] left padding masked


def test_gumbel_sampler_draws_from_softmax_at_t_with_each_rows_noise_from_its_own_seed():  # [4, 5]
    import torch

    from nlpkit.ppo.rollout import GumbelSampler

    logits = torch.tensor([0.0, 1.0, 2.0, -1.0])
    prompt = torch.zeros(20000, 3, dtype=torch.long)
    picks = GumbelSampler(list(range(20000)), 0.7, 3)(prompt, logits.repeat(20000, 1)).argmax(1)
    frequencies = torch.bincount(picks, minlength=4) / 20000
    assert frequencies.tolist() == pytest.approx(torch.softmax(logits / 0.7, 0).tolist(), abs=0.01)

    scores = torch.randn(3, 5)
    batch = GumbelSampler([5, 6, 7], 0.7, 3)(prompt[:3], scores)
    assert torch.equal(GumbelSampler([6], 0.7, 3)(prompt[:1], scores[1:2]), batch[1:2])  # alone or in a batch
    assert not torch.equal(GumbelSampler([6], 0.7, 2)(prompt[:1], scores[1:2]), batch[1:2])  # another position


def rlhf_process(recipe, out: Path, *flags):
    """`nlpkit rlhf` in a process of its own (one thread, output to files beside `out`), so it can be killed."""
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "nlpkit", "rlhf", recipe, "--output-dir", str(out), "--json", *flags]
    stdout, stderr = (open(out.with_suffix(suffix), "a") for suffix in (".out", ".err"))
    return subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=stdout, stderr=stderr)


def test_ppo_killed_and_resumed_ends_like_an_uninterrupted_run(tmp_path, toy_llama, toy_reward_model):
    import random
    import signal
    import time

    import torch
    from safetensors.torch import load_file

    # With the adaptive KL controller [13] (its coefficient is restored from the checkpoint) and the reward baseline
    # [10] (measured again on resume, from the same seed), so both must come back exactly.
    recipe = rlhf_recipe(tmp_path, toy_llama, toy_reward_model, lora=True, total_episodes=160, eval_prompts=8,
                         kl_target=0.5, kl_horizon=64, reward_baseline_prompts=16)
    raw = yaml.safe_load(Path(recipe).read_text())
    raw["train"] |= {"save_strategy": "steps", "save_steps": 2}
    Path(recipe).write_text(yaml.safe_dump(raw))
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert rlhf_process(recipe, reference).wait() == 0, reference.with_suffix(".err").read_text()

    process = rlhf_process(recipe, killed)
    kill_at = random.Random().randint(3, 8)  # updates; the first checkpoint is written after update 2
    while not (killed / "train_log.jsonl").is_file() or len(read_log(killed)) < kill_at:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "nlpkit_run.json").exists()
    state = torch.load(next((killed / "checkpoints").glob("checkpoint-*/ppo_state.pt")), weights_only=True)
    # trainable weights only: the adapters and the value head, not the frozen bases
    assert all("lora_" in key or "modules_to_save" in key for part in ("policy", "value_model") for key in state[part])

    assert rlhf_process(recipe, killed, "--resume").wait() == 0, killed.with_suffix(".err").read_text()
    assert "resuming from" in killed.with_suffix(".err").read_text()
    expected, got = (json.loads((run / "metrics.json").read_text()) for run in (reference, killed))
    assert got["episodes"] == expected["episodes"] == 160  # the episode count continued, not restarted
    for key in ("eval_score_before", "eval_score_after", "objective/kl", "objective/scores", "reward_bias"):
        assert got[key] == pytest.approx(expected[key], abs=1e-3), key
    coefs = [[e["objective/kl_coef"] for e in read_log(run)] for run in (reference, killed)]
    assert coefs[1] == pytest.approx(coefs[0], rel=1e-3) and coefs[0][-1] != 0.05  # restored, and it did move
    assert [e["step"] for e in read_log(killed)] == list(range(1, 11))  # every update once
    before, after = (load_file(run / "adapter_model.safetensors") for run in (reference, killed))
    assert max((before[k] - after[k]).abs().max().item() for k in before) < 1e-5
    assert not list((killed / "checkpoints").glob(".*.tmp"))  # no half-written checkpoint left behind


def test_ppo_watchdog_stops_a_collapsed_policy_with_exit_3(tmp_path, toy_llama, toy_reward_model):
    recipe = rlhf_recipe(tmp_path, toy_llama, toy_reward_model, lora=True, total_episodes=48, eval_prompts=0,
                         min_entropy=50.0)  # no 43-word policy has 50 nats of entropy: it trips at update 1
    stopped = nlpkit("rlhf", recipe, "--output-dir", tmp_path / "stop")
    assert stopped.code == 3, stopped.stderr
    line = [x for x in stopped.stderr.splitlines() if x.startswith("error:")][0]
    assert "policy entropy is" in line and "at update 1, below ppo.min_entropy=50.0" in line
    assert "no checkpoint was saved" in line and not (tmp_path / "stop" / "nlpkit_run.json").exists()
    warned = nlpkit("rlhf", recipe, "train.watchdog=warn", "--output-dir", tmp_path / "warn")
    assert warned.code == 0 and "warning: policy entropy is" in warned.stderr


def test_ppo_in_two_processes_logs_the_statistics_of_both(tmp_path, toy_llama, toy_reward_model):
    """Each process rolls out half of every update; the logged objective/scores and objective/kl are the means over
    all 16 episodes, which samples.jsonl lists (every episode of the sampled updates, from both processes); with
    the adaptive KL controller and the reward baseline on."""
    from nlpkit.ppo import core

    recipe = rlhf_recipe(tmp_path, toy_llama, toy_reward_model, lora=True, total_episodes=64, eval_prompts=8,
                         num_sample_generations=4, kl_target=0.5, kl_horizon=64, reward_baseline_prompts=16)
    run = tmp_path / "ppo-2"
    process = rlhf_process(recipe, run, "--num-processes", "2")
    assert process.wait() == 0, run.with_suffix(".err").read_text()
    log = read_log(run)
    assert [e["step"] for e in log] == [1, 2, 3, 4] and log[-1]["episode"] == 64  # 16 episodes per update
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    for entry in log:
        rows = [s for s in samples if s["update"] == entry["step"]]
        assert len(rows) == 16
        assert entry["objective/scores"] == pytest.approx(sum(r["score"] for r in rows) / 16, abs=1e-5)
        assert entry["objective/kl"] == pytest.approx(sum(r["kl"] for r in rows) / 16, abs=1e-5)
    # The policy moved: with LoRA's B = 0 it is the reference, KL exactly 0, until its adapter changes. Not "> 0": a
    # batch's mean k1 can be negative [12], and these few LoRA updates move the policy by ~1e-4 nats per token.
    assert log[0]["objective/kl"] == 0.0 and log[-1]["objective/kl"] != 0.0
    for before, after in zip(log, log[1:]):  # [13] one coefficient for both processes, from the whole batch's KL
        assert after["objective/kl_coef"] == pytest.approx(core.adaptive_kl_coef(
            before["objective/kl_coef"], before["objective/kl"], 0.5, 64, 16))
    stderr = run.with_suffix(".err").read_text()
    assert stderr.count("update 1/4 ") == 1 and "eos" in stderr  # one process talks
    assert "eval_score_after" in json.loads(run.with_suffix(".out").read_text())


def test_ppo_in_two_processes_trains_like_one_process_with_the_same_batch(tmp_path, toy_llama, toy_reward_model):
    """1 process = 2 processes, as tests/test_distributed.py checks for the other stages: in fp32, the same episodes
    (each one's tokens drawn from its own seed, whichever process samples it) and the same gradient (the token mean
    of the whole minibatch, over processes and micro-batches) give the same KL and scores every update, and the same
    weights. One minibatch per epoch: the processes' shares of a minibatch are the one process's minibatch."""
    from safetensors.torch import load_file

    recipe = rlhf_recipe(tmp_path, toy_llama, toy_reward_model, total_episodes=32, batch_size=8, num_mini_batches=1,
                         response_length=8, eval_prompts=0)
    raw = yaml.safe_load(Path(recipe).read_text())
    raw["train"]["gradient_accumulation_steps"] = 2  # micro-batches of 4 episodes in one process, of 2 in two
    Path(recipe).write_text(yaml.safe_dump(raw))
    one, two = tmp_path / "one", tmp_path / "two"
    assert rlhf_process(recipe, one).wait() == 0, one.with_suffix(".err").read_text()
    assert rlhf_process(recipe, two, "--num-processes", "2").wait() == 0, two.with_suffix(".err").read_text()
    single, double = read_log(one), read_log(two)
    assert [e["step"] for e in single] == [e["step"] for e in double] == [1, 2, 3, 4]
    for a, b in zip(single, double):
        for key in ("objective/kl", "objective/scores"):
            assert b[key] == pytest.approx(a[key], abs=1e-4), (a["step"], key)
    a, b = (load_file(run / "model.safetensors") for run in (one, two))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    # and the policy moved (its KL left the exact 0 of a copy of the reference): not the equality of untrained copies
    assert single[0]["objective/kl"] == 0.0 and single[-1]["objective/kl"] != 0.0
    base = load_file(toy_llama / "model.safetensors")
    assert max((a[k] - base[k]).abs().max().item() for k in a) > 1e-4


def test_full_weight_ppo_imports_neither_peft_nor_trl_nor_datasets(tmp_path, toy_llama):
    """Unused imports are most of a small PPO run's peak memory (benchmarks/ppo_vs_trl.py): peft alone (with the
    bitsandbytes it imports) is ~50 MB. A fresh process, since this test process has imported them all already."""
    import os
    import subprocess
    import sys

    module = tmp_path / "count_reward.py"
    module.write_text("def length(prompts, completions, **_):\n    return [float(len(c)) for c in completions]\n")
    path = rlhf_recipe(tmp_path, toy_llama, None, total_episodes=16, eval_prompts=0)
    recipe = yaml.safe_load(Path(path).read_text())
    recipe["reward"] = {"function": f"{module}:length"}
    (tmp_path / "fn.yaml").write_text(yaml.safe_dump(recipe))
    argv = ["nlpkit", "rlhf", str(tmp_path / "fn.yaml"), "--output-dir", str(tmp_path / "run")]
    script = (f"import sys\nfrom nlpkit.cli import app\nsys.argv = {argv!r}\n"
              "try:\n    app()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
              "print(sorted(name for name in ('peft', 'trl', 'datasets', 'bitsandbytes') if name in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_reference_responses_average_zero_after_the_baseline_and_gradients_are_clipped(tmp_path, toy_llama,
                                                                                       toy_reward_model):
    """[10] The bias is the mean score of the reference's own samples: the same samples, shifted by it, average 0
    (the policy IS the reference before training, and the same seed draws the same responses). Then the loop clips
    the gradient norm of policy and value together (ppo.max_grad_norm)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nlpkit.recipes import load_recipe
    from nlpkit.ppo.rollout import episode_seeds, make_rollout
    from nlpkit.ppo.update import train_on_rollout
    from nlpkit.scoring import Scorer
    from nlpkit.stages.ppo import load_value_model, reference_score_bias

    cfg = load_recipe(rlhf_recipe(tmp_path, toy_llama, toy_reward_model, missing_eos_penalty=None,
                                  max_grad_norm=1e-3))
    tokenizer = AutoTokenizer.from_pretrained(toy_llama, padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(toy_llama)
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    scorer = Scorer(cfg.reward, False, torch.device("cpu"))
    value = load_value_model(cfg, cfg.ppo, tokenizer, scorer)
    batch = [{"prompt": p} for p in ("the cat sits", "a dog runs", "one bird", "two fish")] * 4
    args = (cfg.ppo, [tokenizer.eos_token_id], False, torch.device("cpu"))
    bias = reference_score_bias(policy, reference, tokenizer, scorer, batch, 7, *args, rank=0, world=1,
                                gather=lambda x: [x])
    seeds = episode_seeds(7, 0, range(len(batch)))  # the seeds of the baseline's responses: run seed 7, before update 1
    plain = make_rollout(policy, reference, value, tokenizer, scorer, batch, seeds, *args)
    rollout = make_rollout(policy, reference, value, tokenizer, scorer, batch, seeds, *args, reward_bias=bias)
    assert bias == pytest.approx(plain["scores"].mean().item(), abs=1e-5) and abs(bias) > 0.1
    assert rollout["scores"].mean().item() == pytest.approx(0.0, abs=1e-5)

    norms = []
    optimizer = torch.optim.AdamW([*policy.parameters(), *value.parameters()], lr=1e-3)
    optimizer.register_step_pre_hook(lambda opt, *_: norms.append(torch.nn.utils.get_total_norm(
        [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]).item()))
    stats = train_on_rollout(policy, value, optimizer, rollout, cfg.ppo, 1, torch.Generator().manual_seed(0), False)
    assert len(norms) == 8 and max(norms) <= 1e-3 * 1.0001  # 4 epochs x 2 minibatches, every step clipped
    assert stats["grad_norm"] > 1e-3  # the logged norm is the one before clipping


def test_adaptive_kl_coefficient_moves_towards_the_target_and_the_baseline_is_recorded(tmp_path, toy_llama,
                                                                                        toy_reward_model):
    """[10, 13] through the CLI: kl_coef follows Ziegler's controller update after update (logged as
    objective/kl_coef); the reward bias is measured once and reported; clipped scores stay in range."""
    from nlpkit.ppo import core

    recipe = rlhf_recipe(tmp_path, toy_llama, toy_reward_model, lora=True, total_episodes=48, eval_prompts=0,
                         kl_target=0.5, kl_horizon=64, reward_baseline_prompts=32, reward_clip=0.5)
    result = nlpkit("rlhf", recipe, "--output-dir", tmp_path / "run", "--json")
    assert result.code == 0, result.stderr
    log = read_log(tmp_path / "run")
    assert log[0]["objective/kl_coef"] == 0.05  # the recipe's kl_coef to start
    for before, after in zip(log, log[1:]):
        assert after["objective/kl_coef"] == pytest.approx(core.adaptive_kl_coef(
            before["objective/kl_coef"], before["objective/kl"], 0.5, 64, 16))
    assert isinstance(result.json()["reward_bias"], float) and "reward baseline" in result.stderr
    assert all(abs(entry["objective/scores_without_penalty"]) <= 0.5 for entry in log)
