"""Training on tensors: the step, the epoch loop, fit, checkpoints, devices, torchrun, signals.

Nothing here imports MLflow, tracking or sweeps: fit writes through the small RunLog
interface (cnnlab.training.fit) that tracking's Tracker implements."""
