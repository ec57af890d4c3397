"""The platform under every stage: storage, MLflow, the Ray cluster, model folders, flags, errors.

Holds:
    storage       local folders and s3:// prefixes alike (s3fs): read, write atomically, list, copy
    tracking      MLflow runs: open or resume one, log params, metrics and artifacts, survive an outage
    registry      MLflow's model registry: register a trained bundle, find the one to serve
    cluster       connect to Ray or start a local one (ensure_ray), with the job's environment
    model_store   model folders from a local path, s3:// or runs:/ URI, cached per node; their digests
    flags         dataclass fields as command-line flags: one parser for every job
    errors        ConfigError: the one-line error a wrong config fails with, on the driver

Imports: cmd_model
"""
