"""The offline `tiny` world: procedurally drawn, captioned 64x64 images (`world`), the trainer of
the tiny base model on it (`base_trainer`), and the weights this project trained (`assets/`)."""
