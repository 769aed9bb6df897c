"""Fixed-depth rollout workers (torch engine, vLLM engine). Never imports the trainer (`rl`)."""
