"""Send what a training job could not log (its tracking server was away) to its MLflow run.

    python jobs/upload_unlogged.py out/runs/motion-a/unlogged
    python jobs/upload_unlogged.py s3://bucket/runs/motion-a/unlogged

The folder is the one the job's last line named (<storage>/<name>/unlogged: metrics.jsonl,
artifacts/, run.json). The tracking server is MLFLOW_TRACKING_URI's; the run, once sent, is
marked FINISHED if it was left RUNNING.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipelines.platform import storage, tracking


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", help="<storage>/<name>/unlogged, as the job's error line names it")
    p.add_argument("--s3-endpoint-url", help="an S3-compatible endpoint (MinIO, SeaweedFS) for an s3:// folder")
    args = p.parse_args(argv)
    if args.s3_endpoint_url:
        storage.configure_s3(endpoint_url=args.s3_endpoint_url)
    try:
        storage.check_readable(storage.join(args.folder, tracking.UNLOGGED_RUN_FILE), "unlogged folder")
        uri = tracking.tracking_uri()
        tracking.check_reachable(uri)
    except (storage.StorageError, tracking.TrackingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(tracking.upload_unlogged(args.folder, uri)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
