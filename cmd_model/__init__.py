"""The CMD model itself: autoencoder, content and motion denoisers, diffusion, metrics, presets.

Plain PyTorch and diffusers, runnable in a notebook: no Ray, no MLflow, no storage.

Imports: (nothing of this project's other packages)
"""
