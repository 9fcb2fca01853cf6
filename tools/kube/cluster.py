"""A real etcd + kube-apiserver on 127.0.0.1 for tests and benchmarks (no kubelet, no controllers).

``KubeCluster.start(workdir)`` generates a CA and serving certificate, a service-account
signing key and a token file (the admin is in ``system:masters``), starts etcd on ports it
picks itself (port 0; the ports are read back from its log), starts kube-apiserver with RBAC
authorization, waits for ``/readyz`` and writes an admin kubeconfig.

kube-apiserver cannot bind port 0 and report the port, so its secure port is probed (bind
port 0, close, pass the number): a known small race, retried when the server reports the
address in use.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import re
import secrets
import signal
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

LOOPBACK = "127.0.0.1"
ETCD_CLIENT_RE = re.compile(rb"serving insecure client requests on 127\.0\.0\.1:(\d+)")
START_TIMEOUT_S = 60.0


class ClusterError(RuntimeError):
    pass


# ---- certificates -------------------------------------------------------------------------
def _pem_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_certs(d: Path) -> tuple[Path, Path, Path]:
    """A CA, a serving cert for 127.0.0.1/localhost signed by it, and its key: (ca, cert, key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "epp-test-ca")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address(LOOPBACK))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = d / "ca.crt", d / "apiserver.crt", d / "apiserver.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(_pem_key(key))
    return paths


def write_sa_key(d: Path) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = d / "sa.key"
    path.write_bytes(_pem_key(key))
    return path


# ---- processes ----------------------------------------------------------------------------
class _LogPump(threading.Thread):
    """Copies a process's output to a log file and signals when a pattern first appears."""

    def __init__(self, stream: IO[bytes], log_path: Path, pattern: re.Pattern[bytes] | None = None) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.log_path = log_path
        self.pattern = pattern
        self.match: re.Match[bytes] | None = None
        self.matched = threading.Event()

    def run(self) -> None:
        with open(self.log_path, "ab") as log:
            for line in self.stream:
                log.write(line)
                log.flush()
                if self.pattern is not None and self.match is None and (m := self.pattern.search(line)):
                    self.match = m
                    self.matched.set()
        self.matched.set()  # the process exited: wake any waiter


def _probe_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _stop(proc: subprocess.Popen[bytes] | None, grace: float = 10.0) -> None:
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()  # its _LogPump sees EOF (the process is gone) and ends


@dataclass
class KubeCluster:
    workdir: Path
    apiserver_bin: Path
    etcd_bin: Path
    admin_token: str = field(default_factory=lambda: secrets.token_hex(16))
    port: int = 0
    etcd_port: int = 0
    ca_file: Path = Path()
    kubeconfig: Path = Path()
    _etcd: subprocess.Popen[bytes] | None = None
    _apiserver: subprocess.Popen[bytes] | None = None

    @property
    def server(self) -> str:
        return f"https://{LOOPBACK}:{self.port}"

    # ---- lifecycle --------------------------------------------------------------------
    def start(self) -> KubeCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        pki = self.workdir / "pki"
        pki.mkdir(exist_ok=True)
        self.ca_file, self._cert, self._key = write_certs(pki)
        self._sa_key = write_sa_key(pki)
        self._tokens = self.workdir / "tokens.csv"
        self._tokens.write_text(f'{self.admin_token},epp-test-admin,epp-test-admin,"system:masters"\n')
        try:
            self._start_etcd()
            self._start_apiserver()
        except BaseException:
            self.stop()
            raise
        self.kubeconfig = self.write_kubeconfig(self.workdir / "admin.kubeconfig", self.admin_token, "admin")
        return self

    def stop(self) -> None:
        _stop(self._apiserver)
        _stop(self._etcd)
        self._apiserver = self._etcd = None

    def restart_apiserver(self) -> float:
        """Stop kube-apiserver and start it again on the same port; returns the seconds it took.

        SIGTERM first; with watches open, this kube-apiserver stops listening at once but then
        does not exit for ~10 s, so it gets SIGKILL after 1 s (clients see the same either way:
        their connections close).
        """
        started = time.monotonic()
        _stop(self._apiserver, grace=1.0)
        self._apiserver = None
        self._start_apiserver(port=self.port)
        return time.monotonic() - started

    def _start_etcd(self) -> None:
        url = f"http://{LOOPBACK}:0"
        cmd = [
            str(self.etcd_bin), "--name", "epp-test", "--data-dir", str(self.workdir / "etcd"),
            "--listen-client-urls", url, "--advertise-client-urls", url,
            "--listen-peer-urls", url, "--initial-advertise-peer-urls", url,
            "--initial-cluster", f"epp-test={url}",
        ]
        log = self.workdir / "etcd.log"
        self._etcd = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        assert self._etcd.stdout is not None
        pump = _LogPump(self._etcd.stdout, log, ETCD_CLIENT_RE)
        pump.start()
        if not pump.matched.wait(START_TIMEOUT_S) or pump.match is None:
            raise ClusterError(f"etcd did not start serving:\n{_tail(log)}")
        self.etcd_port = int(pump.match.group(1))

    def _apiserver_cmd(self, port: int) -> list[str]:
        return [
            str(self.apiserver_bin),
            f"--etcd-servers=http://{LOOPBACK}:{self.etcd_port}",
            f"--bind-address={LOOPBACK}", f"--advertise-address={LOOPBACK}", f"--secure-port={port}",
            f"--tls-cert-file={self._cert}", f"--tls-private-key-file={self._key}",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
            f"--token-auth-file={self._tokens}",
            "--authorization-mode=RBAC",
            f"--service-account-issuer=https://{LOOPBACK}:{port}",
            f"--service-account-key-file={self._sa_key}", f"--service-account-signing-key-file={self._sa_key}",
            "--service-cluster-ip-range=10.96.0.0/24",  # allocated from, never contacted
            # No controller manager creates the `default` ServiceAccount; pods here need none.
            "--disable-admission-plugins=ServiceAccount",
            "--endpoint-reconciler-type=none",  # no kubernetes Service endpoints for 127.0.0.1
            "--enable-priority-and-fairness=false",
            "--profiling=false",
            "--v=1",
        ]

    def _start_apiserver(self, *, port: int | None = None, attempts: int = 5) -> None:
        log = self.workdir / "kube-apiserver.log"
        for _ in range(attempts):
            self.port = port or _probe_port()
            self._apiserver = subprocess.Popen(self._apiserver_cmd(self.port), stdout=subprocess.PIPE,
                                               stderr=subprocess.STDOUT, start_new_session=True)
            assert self._apiserver.stdout is not None
            _LogPump(self._apiserver.stdout, log).start()
            if self._wait_ready():
                return
            if "address already in use" not in _tail(log, 60):
                raise ClusterError(f"kube-apiserver exited during start-up:\n{_tail(log)}")
        raise ClusterError(f"kube-apiserver: no free port after {attempts} attempts")

    def _wait_ready(self) -> bool:
        """True once /readyz answers 200; False if the process exited first.

        Another process's readiness can only be observed by asking it: poll every 50 ms,
        bounded by START_TIMEOUT_S.
        """
        assert self._apiserver is not None
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        request = urllib.request.Request(f"{self.server}/readyz",
                                         headers={"Authorization": f"Bearer {self.admin_token}"})
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._apiserver.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(request, context=ctx, timeout=2) as resp:
                    if resp.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._apiserver.wait(0.05)  # the pause between polls, cut short if it exits
        _stop(self._apiserver)
        raise ClusterError(f"kube-apiserver not ready within {START_TIMEOUT_S:.0f}s:\n"
                           f"{_tail(self.workdir / 'kube-apiserver.log')}")

    # ---- identities ---------------------------------------------------------------------
    def write_kubeconfig(self, path: Path, token: str, user: str) -> Path:
        doc = {
            "apiVersion": "v1", "kind": "Config", "current-context": user,
            "clusters": [{"name": "epp-test", "cluster": {"server": self.server,
                                                          "certificate-authority": str(self.ca_file)}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": user, "context": {"cluster": "epp-test", "user": user}}],
        }
        path.write_text(yaml.safe_dump(doc))
        return path

    def describe(self) -> str:
        return json.dumps({"server": self.server, "etcd": self.etcd_port, "workdir": str(self.workdir)})
