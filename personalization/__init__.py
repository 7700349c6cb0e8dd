"""Learning from feedback: rollouts, judges, GRPO-TCR, OPD, the LoRA trainer, gates and evaluation."""
