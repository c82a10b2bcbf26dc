"""mnist-dist: the reference MNIST CNN trained with one Accelerate loop on CPU, GPU, DDP or SLURM."""
