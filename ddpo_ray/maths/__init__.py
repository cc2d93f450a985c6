"""The maths of DDPO, with no Ray: DDIM steps with log-probs and trajectory sampling (`diffusion`),
advantages (`advantages`), the PPO and score-function losses (`ppo`), keyed randomness
(`seeding`), which policy version samples which epoch (`staleness`), epoch shards (`sharding`)
and per-epoch summary statistics (`stats`)."""
