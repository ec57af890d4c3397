"""Data: videos in, clips and latents out (Ray Data).

Holds:
    sources           list the videos of a folder, s3:// prefix or manifest (Arrow, one row per video)
    video/            one video file -> 16-frame clip rows inside shots, every failure a reason (no Ray in it)
    decode_stage      the decode step every job that reads videos shares: a Ray Data stage of decoder tasks
    latent_encoder    the encode step: clips -> content and motion latents (SD VAE + CMD autoencoder)
    shard_sink        the write step: ShardSink actors that write few, atomic Parquet shards
    latent_shards     the Parquet layout of latents and error rows, read and written by every stage
    precompute        the precompute job's driver: check, plan (resume), decode -> encode -> write, report
    report            what an output holds (report.json, report.html): videos, shots, clips, motion, static clips
    synthetic_videos  the demo's and tests' videos: coloured shapes that move one way per class

Imports: cmd_model, pipelines.platform
"""
