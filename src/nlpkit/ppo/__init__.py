"""nlpkit's own PPO for language models (trl removed its PPOTrainer): the math in core.py, one rollout in rollout.py,
one update in update.py, checkpoints in checkpoint.py; the loop is stages/ppo.py."""
