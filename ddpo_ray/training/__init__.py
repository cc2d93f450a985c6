"""One DDPO epoch, with no Ray: its steps (`steps`), held-out evaluation (`evaluation`), the epoch
path both loops share (`epoch_loop`) and the single-process loop (`local_loop`)."""
