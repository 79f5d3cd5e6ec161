"""Demo models: a small VAE and class-conditional DiT trained on Fashion-MNIST, shipped in the package."""
