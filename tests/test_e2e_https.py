"""`proxyctl serve` over HTTPS (certificates from a throwaway CA made by trustme): every worker
serves TLS on the one port, the openai SDK verifies it with the CA, a plain-HTTP request to the
port fails cleanly without hurting the worker, and bad certificate files stop start-up with one
line and a non-zero exit (no traceback)."""

from __future__ import annotations

import http.client
import json
import signal
import ssl
import subprocess
import sys

import httpx2
import openai
import pytest
import trustme
from click.testing import CliRunner

from tornado_proxy.cli import cli
from tornado_proxy.tls import server_context

from .test_e2e_serve import HELLO, MASTER_KEY, PROVIDER_KEY, PROXYCTL, ROOT, FakeProvider, Served, child_env, \
    children_of, free_port, wait_for


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def tls_files(ca, tmp_path):
    """(certificate chain, key, CA) files for 127.0.0.1 and localhost."""
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = tmp_path / "server.crt", tmp_path / "server.key", tmp_path / "ca.pem"
    paths[0].write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(paths[1]))
    ca.cert_pem.write_to_path(str(paths[2]))
    return tuple(str(p) for p in paths)


class HttpsServed(Served):
    """`proxyctl serve` on a free port with HTTPS files given by flags or environment."""

    def __init__(self, tmp_path, config: str, workers: int, ca_file: str, *args: str, **env: str):
        super().__init__(tmp_path, config, workers, *args, **env)
        self.url = f"https://127.0.0.1:{self.port}"
        self.client_context = ssl.create_default_context(cafile=ca_file)

    def get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.client_context, timeout=5)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"proxyctl serve exited with {self.proc.returncode}:\n{self.stderr()}")
        try:
            return self.get("/health/liveliness")[0] == 200
        except OSError:
            return False

    def worker_pid(self) -> int:
        status, body = self.get("/health/readiness")
        assert status == 200
        return json.loads(body)["worker_pid"]


@pytest.fixture
def https_serve(tmp_path):
    started: list[HttpsServed] = []

    def start(config: str, workers: int, ca_file: str, *args: str, **env: str) -> HttpsServed:
        served = HttpsServed(tmp_path, config, workers, ca_file, *args, **env)
        started.append(served)
        wait_for(served.alive, what="/health/liveliness over HTTPS")
        return served

    yield start
    for served in started:
        served.close()


@pytest.fixture
def fake():
    provider = FakeProvider()
    yield provider
    provider.stop()


def config_for(fake: FakeProvider) -> str:
    return ("model_list:\n  - model_name: gpt-fake\n    litellm_params:\n      model: openai/gpt-4o-mini\n"
            f"      api_base: {fake.base}\n      api_key: {PROVIDER_KEY}\n")


def plain_http_fails(port: int) -> bool:
    """A plain-HTTP request to the TLS port gets no HTTP answer (the handshake fails)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/health/liveliness")
        conn.getresponse().read()
    except (http.client.HTTPException, OSError):
        return True
    finally:
        conn.close()
    return False


def test_https_with_two_workers_sdk_plain_and_stream(https_serve, fake, tls_files):
    certfile, keyfile, ca_file = tls_files
    served = https_serve(config_for(fake), 2, ca_file, "--ssl_certfile_path", certfile, "--ssl_keyfile_path", keyfile)
    workers = wait_for(lambda: (lambda w: w if len(w) == 2 else None)(children_of(served.proc.pid)), what="two workers")
    # both workers answer over TLS (new connections land on either; wait until each has been seen)
    seen: set[int] = set()
    wait_for(lambda: seen.add(served.worker_pid()) or seen == workers, timeout=30, what="both workers over HTTPS")

    with httpx2.Client(verify=ssl.create_default_context(cafile=ca_file)) as http_client:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key=MASTER_KEY, max_retries=0, timeout=15,
                               http_client=http_client)
        reply = client.chat.completions.create(model="gpt-fake", messages=HELLO)
        assert reply.choices[0].message.content == "echo: hello over processes"
        stream = client.chat.completions.create(model="gpt-fake", messages=HELLO, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "echo: hello over processes"

    # plain HTTP on the TLS port fails cleanly; the workers stay and keep serving HTTPS
    for _ in range(4):
        assert plain_http_fails(served.port)
    assert served.get("/health/liveliness") == (200, b'"I\'m alive!"')
    assert children_of(served.proc.pid) == workers
    # and a client that does not trust the CA is refused by its own verification
    with pytest.raises(ssl.SSLCertVerificationError):
        http.client.HTTPSConnection("127.0.0.1", served.port, context=ssl.create_default_context(),
                                    timeout=5).request("GET", "/health/liveliness")
    assert "Traceback" not in served.stderr()
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(20) == 0


def test_https_files_from_the_environment(https_serve, tls_files):
    certfile, keyfile, ca_file = tls_files
    served = https_serve("model_list:\n  - model_name: demo\n    litellm_params: {model: mock/demo}\n", 1, ca_file,
                         SSL_CERTFILE_PATH=certfile, SSL_KEYFILE_PATH=keyfile)
    with httpx2.Client(verify=ssl.create_default_context(cafile=ca_file)) as http_client:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key=MASTER_KEY, max_retries=0, http_client=http_client)
        assert client.chat.completions.create(model="demo", messages=HELLO).choices[0].message.content == \
            "hello over processes"


def test_server_context_offers_tls_1_2_and_newer(tls_files):
    context = server_context(tls_files[0], tls_files[1])
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.protocol == ssl.PROTOCOL_TLS_SERVER and context.verify_mode == ssl.CERT_NONE


# --- start-up errors ---------------------------------------------------------------------------------

@pytest.fixture
def bad_files(ca, tmp_path, tls_files):
    other = ca.issue_cert("localhost")
    paths = {"other": tmp_path / "other.key", "junk": tmp_path / "junk.pem"}
    other.private_key_pem.write_to_path(str(paths["other"]))
    paths["junk"].write_text("this is not PEM\n")
    return {**{k: str(v) for k, v in paths.items()}, "cert": tls_files[0], "key": tls_files[1],
            "missing": str(tmp_path / "missing.pem")}


@pytest.mark.parametrize("cert, key, expected", [
    ("missing", "key", "HTTPS: cannot read the certificate file {missing}: No such file or directory"),
    ("cert", "missing", "HTTPS: cannot read the key file {missing}: No such file or directory"),
    ("junk", "key", "HTTPS: {junk}: no PEM certificate in it"),
    ("cert", "junk", "HTTPS: {junk}: no PEM private key in it"),
    ("cert", "other", "HTTPS: the key in {other} does not match the certificate in {cert}"),
])
def test_bad_https_files_stop_start_up_with_one_line(tmp_path, bad_files, cert, key, expected):
    path = tmp_path / "config.yaml"
    path.write_text("model_list: []\n")
    result = CliRunner().invoke(cli, ["serve", "--config", str(path), "--port", "0", "--ssl-certfile",
                                      bad_files[cert], "--ssl-keyfile", bad_files[key]],
                                env={"LITELLM_MASTER_KEY": MASTER_KEY})
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output.strip() == "Error: " + expected.format(**bad_files)


def test_one_https_file_without_the_other_is_a_usage_error(tmp_path, tls_files):
    path = tmp_path / "config.yaml"
    path.write_text("model_list: []\n")
    result = CliRunner().invoke(cli, ["serve", "--config", str(path), "--port", "0", "--ssl-certfile", tls_files[0]],
                                env={"LITELLM_MASTER_KEY": MASTER_KEY})
    assert result.exit_code == 2 and "--ssl-certfile needs --ssl-keyfile too" in result.output


def test_bad_key_in_a_real_start_is_one_line_no_traceback(tmp_path, bad_files):
    (tmp_path / "config.yaml").write_text("model_list: []\n")
    proc = subprocess.run([sys.executable, str(PROXYCTL), "serve", "--config", str(tmp_path / "config.yaml"),
                           "--port", str(free_port())],
                          env=child_env(LITELLM_MASTER_KEY=MASTER_KEY, SSL_CERTFILE_PATH=bad_files["cert"],
                                        SSL_KEYFILE_PATH=bad_files["other"]),
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"Error: HTTPS: the key in {bad_files['other']} does not match the certificate in {bad_files['cert']}"]
