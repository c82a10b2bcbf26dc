"""mnist-dist: the reference MNIST CNN, one Accelerate training loop from CPU to DDP and SLURM."""
