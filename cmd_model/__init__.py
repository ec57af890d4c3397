"""The CMD model itself: autoencoder, content and motion denoisers, diffusion, metrics, presets, and the
memory plan of training them (memory.py).

Plain PyTorch and diffusers, runnable in a notebook: no Ray, no MLflow, no storage.

Imports: (nothing of this project's other packages)
"""
