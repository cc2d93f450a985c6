"""Small test utilities shared by several test files."""

import torch


def randomize_lora(unet: torch.nn.Module, std: float = 0.05, seed: int = 0) -> None:
    """LoRA B starts at zero (adapter = identity); give it values so it changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
