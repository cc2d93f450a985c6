"""ddpo-ray: DDPO fine-tuning of text-to-image diffusion models on Ray.

Data flows config -> models/diffusion (sampling with log-probs) -> rewards -> advantages
-> PPO loss -> learner -> weights back to samplers. The maths modules (`diffusion`,
`advantages`, `ppo`) import no Ray, so `ddpo_ray.local` runs the whole algorithm in one process.
"""

__version__ = "0.1.0"
