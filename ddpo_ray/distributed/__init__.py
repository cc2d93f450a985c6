"""The distributed system on Ray: the driver's epoch loop (`driver`), sampler actors and their
pool (`sampler`, `sampler_pool`), the Ray Train learner (`learner`) and its rendezvous with the
driver (`exchange`), and the weight transport from learner to samplers (`weight_transport`)."""
