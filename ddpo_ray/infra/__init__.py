"""Infrastructure both `ddpo_ray` and `reward_services` need, with no Ray at import: the torch
thread (`torch_thread`), the metrics backend (`metrics_backend`), the tables of names a config
may use (`reward_names`, `prompt_names`), Hugging Face loading (`hf_loading`), image-batch
validation (`images`) and logging set-up (`logs`)."""
