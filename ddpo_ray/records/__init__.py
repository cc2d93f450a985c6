"""What a run leaves behind: its directory (`run_dir`), crash-safe files (`files`, `jsonl`), image
grids (`grids`), the reward curve (`curves`), checkpoints (`checkpoint`), Prometheus metrics
(`metrics`) and the console lines (`console`)."""
