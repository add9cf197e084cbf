"""nlpkit's own PPO for language models (trl removed its PPOTrainer): the math in core.py, the loop in stages/rlhf.py."""
