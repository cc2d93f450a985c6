"""The models: frozen pipelines (`pipelines`) and the trainable LoRA on their UNet (`lora`)."""
