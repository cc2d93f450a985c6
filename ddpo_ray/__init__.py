"""ddpo-ray: DDPO fine-tuning of text-to-image diffusion models on Ray.

Read it in data-flow order, one layer a subpackage:

    config/       the run configuration (pydantic), presets, YAML and overrides
    infra/        what every layer needs, without Ray: torch thread, metrics backend, reward
                  names, Hugging Face loading, image validation, logging
    maths/        DDIM log-probs, advantages, PPO losses, seeding, staleness, sharding (no Ray)
    models/       frozen pipelines and the trainable LoRA
    prompts/      prompt sets and the per-epoch prompt sampler
    tiny/         the offline tiny world and the trainer of its base model
    training/     one epoch's steps, held-out evaluation, the epoch path both loops share,
                  the single-process loop (no Ray)
    distributed/  the driver, sampler actors, the Ray Train learner, weight transport (Ray)
    records/      the run directory, JSONL, grids, curves, checkpoints, metrics, console lines
    run.py, local.py, evaluate.py   the entry points (`python -m ddpo_ray.run`, ...)

Rewards live beside this package, in `reward_services/` (functions, Serve applications, client).
"""

__version__ = "0.1.0"
