"""nlpkit's own PPO for language models (trl removed its PPOTrainer): the math in core.py, checkpoints in
checkpoint.py, the loop in stages/ppo.py."""
