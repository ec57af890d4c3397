"""The cluster rehearsal (issue 27): the shipped manifests' jobs, as written, on a cluster shaped
like the shipped ones, on this machine. tests/test_cluster_rehearsal.py runs it inside a network
namespace of its own (only `lo`), which it needs: the nodes bind beyond loopback there.

    ip netns add rh && ip netns exec rh ip link set lo up
    ip netns exec rh .venv/bin/python -m tests.cluster_rehearsal

The cluster, as the KubeRay manifests make it:
- a head with no CPUs (`num-cpus: "0"`): job drivers run there, no task or actor does;
- no worker node when a job is submitted: worker nodes join after the first submission, as an
  autoscaler scales from zero;
- each worker node with private files: a mount namespace with its own tmpfs over this rehearsal's
  folder, which holds every local input and the drivers' TMPDIR, and its own HOME. A path that
  exists only on the driver's machine does not exist there;
- S3 (SeaweedFS) the only storage the nodes share; MLflow a real server keeping its artifacts in
  the bucket; Ray token authentication on.

Every job goes through `ray job submit --working-dir .`, in the order a user runs them: autoencoder,
precompute, content, motion, tune, one retraining round, generate from the registered model,
evaluate. The entrypoints are the manifests' own (infra/kuberay/*.yaml), with one documented
substitution for all (`substitute`): the tiny preset and small sizes, this bucket for
s3://cmd-ray-data, the Stable Diffusion a local folder on the driver (the hub has no network here;
a local folder is the harder case: the jobs must send it to the workers), the autoencoder run id
that the autoencoder job printed, and a small sweep file for the paper-sized one.

Prints one JSON line per stage and a last line {"rehearsal": "passed", ...}; exits 1 on the
first stage that fails, with the tail of its log.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
JOB_TIMEOUT_S = 600
NODE_CPUS = (2, 2)  # two worker nodes; the head has none
SWEEP = """\
metric: eval/loss
mode: min
scheduler: {grace_period: 1, reduction_factor: 2}
space:
  lr: {loguniform: [3.0e-4, 3.0e-3]}
  model.depth: {randint: [1, 2]}
"""
SIZES = {  # flag -> its value in the rehearsal; None drops the flag (a switch)
    "--preset": "tiny",
    "--max-steps": "2",
    "--num-workers": "1",
    "--cpus-per-worker": "1",
    "--use-gpu": None,
    "--encoders": "1",
    "--decoders": "1",
    "--num-samples": "2",
    "--max-concurrent": "1",
}


def substitute(argv: list[str], bucket: str, sd: str, sweep: str, autoencoder_run: str | None) -> list[str]:
    """A manifest entrypoint -> what the rehearsal runs (the one substitution, the same for all)."""
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        if token in SIZES:
            if SIZES[token] is None:
                i += 1
                continue
            out += [token, SIZES[token]]
            i += 2
            continue
        if token in ("--stable-diffusion", "--vae"):
            out += [token, sd]
            i += 2
            continue
        if token == "--search":
            out += [token, sweep]
            i += 2
            continue
        token = token.replace("/app/", "").replace("s3://cmd-ray-data", bucket)
        if autoencoder_run:
            token = token.replace("AUTOENCODER_RUN_ID", autoencoder_run)
        out.append(token)
        i += 1
    return out


def manifest_entrypoints() -> dict[str, list[str]]:
    """{job script stem: argv} from infra/kuberay (RayJobs and the RayCronJob)."""
    import yaml

    found = {}
    for path in sorted((ROOT / "infra" / "kuberay").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") not in ("RayJob", "RayCronJob"):
                continue
            spec = doc["spec"] if doc["kind"] == "RayJob" else doc["spec"]["jobTemplate"]
            argv = shlex.split(spec["entrypoint"])
            found[Path(argv[1]).stem] = argv
    return found


class Rehearsal:
    def __init__(self):
        from tests.fixtures_services import AUTH_ENV

        # Short: Ray puts unix sockets below the worker nodes' temp dir here.
        self.work = Path(tempfile.mkdtemp(prefix="reh-", dir="/tmp"))
        (self.work / "driver-tmp").mkdir()
        self.token = self._token()
        self.auth = {**AUTH_ENV, "RAY_AUTH_TOKEN": self.token}
        self.nodes: list[subprocess.Popen] = []
        self.report: list[dict] = []

    @staticmethod
    def _token() -> str:
        path = Path.home() / ".ray" / "auth_token"
        if not path.exists():
            subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], check=True, capture_output=True)
        return path.read_text().strip()

    # -- the cluster ------------------------------------------------------------------------------

    def start_head(self, s3_env: dict) -> None:
        from tests.fixtures_services import start_ray_head

        # Job drivers start below the head: their temp files land in driver-tmp, which no worker node sees.
        env = {**s3_env, **self.auth, "TMPDIR": str(self.work / "driver-tmp")}
        self.head = start_ray_head(num_cpus=0, nodes_may_join=True, env=env)
        self.s3_env = s3_env

    def add_worker_node(self, cpus: int) -> None:
        """A node with its own files: a tmpfs over this rehearsal's folder and its own HOME (as a
        pod with its own disk); it reaches S3 with the same credentials (as a pod's role would)."""
        n = len(self.nodes)
        ip, private = f"127.0.0.{n + 2}", self.work
        log = self.work / f"node{n}.log"
        start = (
            f"mount -t tmpfs tmpfs {private} && mkdir -p {private}/home {private}/ray && "
            f"export HOME={private}/home TMPDIR={private} && exec {BIN}/ray start --block "
            f"--address={self.head.address} --node-ip-address={ip} --num-cpus={cpus} --num-gpus=0 "
            f"--temp-dir={private}/ray --disable-usage-stats"
        )
        env = {
            **os.environ,
            **self.s3_env,
            **self.auth,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                ["unshare", "-m", "--propagation", "private", "sh", "-c", start],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + 120
        while b"Ray runtime started" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker node {n} did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        self.nodes.append(proc)

    def stop(self) -> None:
        for proc in self.nodes:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if getattr(self, "head", None) is not None:
            self.head.stop()
        shutil.rmtree(self.work, ignore_errors=True)

    # -- jobs -------------------------------------------------------------------------------------

    def submit(self, stage: str, argv: list[str], env_vars: dict, then=None, ok: bool = True) -> str:
        """`ray job submit --working-dir .` as a user runs it; `then` runs once the job is submitted
        (the worker nodes join then). Returns the job's log; exits when it does not end as `ok` says."""
        cmd = [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            self.head.dashboard_url,
            "--working-dir",
            str(ROOT),
            "--runtime-env-json",
            json.dumps({"env_vars": env_vars}),
            "--no-wait",
            "--",
            *argv,
        ]
        env = {**os.environ, **self.auth}
        started = time.monotonic()
        submitted = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        found = re.search(r"raysubmit_\w+", submitted.stdout + submitted.stderr)
        if submitted.returncode or not found:
            self.fail(stage, submitted.stdout + submitted.stderr)
        job = found.group(0)
        if then is not None:
            then()
        logs = subprocess.run(
            [str(BIN / "ray"), "job", "logs", "--address", self.head.dashboard_url, "--follow", job],
            env=env,
            capture_output=True,
            text=True,
            timeout=JOB_TIMEOUT_S,
        )
        status = subprocess.run(
            [str(BIN / "ray"), "job", "status", "--address", self.head.dashboard_url, job],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        text = logs.stdout + logs.stderr
        if ("succeeded" in (status.stdout + status.stderr).lower()) != ok:
            self.fail(stage, text + status.stdout + status.stderr)
        self.report.append({"stage": stage, "job": job, "seconds": round(time.monotonic() - started, 1)})
        return text

    def fail(self, stage: str, text: str) -> None:
        print(json.dumps({"stage": stage, "failed": True}), flush=True)
        print(text[-8000:], flush=True)
        raise SystemExit(1)


def last_json(text: str, key: str) -> dict:
    """The job's summary line (the last line that is a JSON object with `key`)."""
    for line in reversed(text.splitlines()):
        start = line.find("{")
        if start >= 0 and f'"{key}"' in line:
            return json.loads(line[start:])
    raise AssertionError(f"no JSON line with {key!r} in:\n{text[-3000:]}")


def main() -> int:
    import s3fs

    from cmd_model.content import build_tiny_sd
    from cmd_model.presets import get_preset
    from pipelines.data.synthetic_videos import make_dataset
    from pipelines.platform import storage
    from tests.fixtures_s3 import seaweedfs
    from tests.fixtures_services import start_mlflow_server, stop_mlflow_server

    rehearsal = Rehearsal()
    work = rehearsal.work
    mlflow_proc = None
    try:
        with seaweedfs(work / "s3") as s3:
            s3_env = s3.env()
            os.environ.update(s3_env)  # this process reads the bucket too
            fs = s3fs.S3FileSystem(
                key=s3.access_key, secret=s3.secret_key, endpoint_url=s3.endpoint_url, skip_instance_cache=True
            )
            fs.mkdir("cmd-rehearsal")
            bucket = "s3://cmd-rehearsal"
            (work / "mlflow").mkdir()
            mlflow, mlflow_proc = start_mlflow_server(work / "mlflow", artifacts=f"{bucket}/mlflow", env=s3_env)
            os.environ["MLFLOW_TRACKING_URI"] = mlflow.url

            # The user's data in the bucket; the SD and the sweep file on the driver's disk only.
            storage.upload_dir(str(make_dataset(work / "videos", 8, seed=3).parent), f"{bucket}/videos")
            storage.upload_dir(str(make_dataset(work / "held-out", 1, seed=9).parent), f"{bucket}/held-out")
            sd = str(build_tiny_sd(work / "tiny-sd", text_dim=get_preset("tiny").motion.text_dim))
            sweep = work / "sweep.yaml"
            sweep.write_text(SWEEP)
            storage.write_text(f"{bucket}/prompts.txt", "a red square moving right\na blue square moving up\n")

            rehearsal.start_head(s3_env)
            env_vars = {"MLFLOW_TRACKING_URI": mlflow.url}  # as the manifests' runtimeEnvYAML
            entry = manifest_entrypoints()

            def run(stage: str, argv: list[str], then=None, ok: bool = True) -> str:
                return rehearsal.submit(stage, argv, env_vars, then=then, ok=ok)

            def args(job: str, run_id: str | None = None) -> list[str]:
                argv = substitute(entry[job], bucket, sd, str(sweep), run_id)
                # The nightly round names no SD (the preset's hub id); the tiny preset has none.
                return argv if "--stable-diffusion" in argv or "--vae" in argv else [*argv, "--stable-diffusion", sd]

            def nodes_join():
                for cpus in NODE_CPUS:
                    rehearsal.add_worker_node(cpus)

            # 1. The autoencoder, submitted while the cluster has no worker node.
            ae = last_json(run("autoencoder", args("train_autoencoder"), then=nodes_join), "run_id")
            checks = {"autoencoder": ae["run_id"]}
            # A GPU job that would count the GPUs up now (none: the GPU pods scale from zero)
            # refuses in one line, before any actor starts, naming the flag to give.
            unsized = [
                a for a in args("precompute_latents", ae["run_id"]) if a not in ("--encoders", "--decoders", "1")
            ]
            refused = run("unsized GPU precompute refuses", [*unsized, "--use-gpu"], ok=False)
            assert "error: --use-gpu, and the cluster has no GPU up yet" in refused, refused[-3000:]
            # 2-4. Latents, then the content and motion models on them.
            run("precompute", args("precompute_latents", ae["run_id"]))
            summary = json.loads(storage.read_text(f"{bucket}/latents/v3/summary.json"))
            assert summary["clips_total"] > 0 and summary["videos_failed"] == 0, summary
            content = last_json(run("content", args("train_content")), "run_id")
            motion = last_json(run("motion", args("train_motion", ae["run_id"])), "run_id")
            # 5. The sweep.
            tune = last_json(run("tune", args("tune")), "parent_run_id")
            assert tune["best_trial"] is not None, tune
            # 6. One retraining round: registers and promotes version 1.
            run("retrain", args("retrain"))
            # 7-8. Generate from the registered model on the cluster, then evaluate.
            samples = f"{bucket}/samples"
            run(
                "generate",
                [
                    "python",
                    "jobs/generate.py",
                    "--model",
                    "models:/cmd-webvid@production",
                    "--prompts-file",
                    f"{bucket}/prompts.txt",
                    "--generators",
                    "1",
                    "--steps-content",
                    "2",
                    "--steps-motion",
                    "2",
                    "--out",
                    samples,
                ],
            )
            videos = json.loads(storage.read_text(f"{samples}/videos.json"))
            assert len(videos) == 2, videos
            run(
                "evaluate",
                [
                    "python",
                    "jobs/evaluate.py",
                    "--preset",
                    "tiny",
                    "--real",
                    f"{bucket}/held-out/",
                    "--generated",
                    samples,
                    "--autoencoder",
                    f"runs:/{ae['run_id']}/autoencoder",
                    "--stable-diffusion",
                    sd,
                    "--max-videos",
                    "4",
                ],
            )

            # Every training run finished, with its artifacts in the bucket.
            from mlflow import MlflowClient

            client = MlflowClient(mlflow.url)
            stored = fs.find("cmd-rehearsal/mlflow")
            for name, run_id in {**checks, "content": content["run_id"], "motion": motion["run_id"]}.items():
                assert client.get_run(run_id).info.status == "FINISHED", name
                assert any(f"/{run_id}/artifacts/" in p for p in stored), (name, stored[:10])
            version = client.get_model_version_by_alias("cmd-webvid", "production")
            for stage in rehearsal.report:
                print(json.dumps(stage), flush=True)
            print(
                json.dumps(
                    {
                        "rehearsal": "passed",
                        "stages": len(rehearsal.report),
                        "registered": f"cmd-webvid/{version.version}",
                        "nodes": 1 + len(rehearsal.nodes),
                    }
                ),
                flush=True,
            )
            return 0
    finally:
        if mlflow_proc is not None:
            stop_mlflow_server(mlflow_proc)
        rehearsal.stop()


if __name__ == "__main__":
    sys.exit(main())
