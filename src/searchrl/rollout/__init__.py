"""Multi-turn search rollouts: generation backends, the action parser, prompts and the loop."""
