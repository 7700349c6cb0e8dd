"""Learning from feedback: rollouts, judges, GRPO-TCR, OPD, the LoRA trainer, gates, publishing, and the
simulated developers (personas) the evaluation uses."""
