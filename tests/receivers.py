"""Real local receivers for notification tests: a webhook HTTP server and an SMTP server
(aiosmtpd) that requires STARTTLS before AUTH, with a self-signed certificate."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


class Receiver:
    """A real webhook receiver on 127.0.0.1; answers ``fail_first`` requests with 503."""

    def __init__(self, fail_first: int = 0) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.raw: list[bytes] = []
        self.calls = 0
        self.fail_first = fail_first
        self.gate: threading.Event | None = None  # when set, each request waits for it (at most 30 s)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.calls += 1
                receiver.raw.append(bytes(self.headers) + data)
                if receiver.gate is not None:
                    receiver.gate.wait(30)
                if receiver.calls <= receiver.fail_first:
                    self.send_response(503)
                    self.end_headers()
                    return
                receiver.bodies.append(json.loads(data))
                self.send_response(204)
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hooks/secret-path"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def self_signed(folder: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))  # fmt: skip
    return cert_path, key_path


class Smtp:
    """aiosmtpd on 127.0.0.1 requiring STARTTLS before AUTH; keeps what it got."""

    def __init__(self, folder: Path, password: str) -> None:
        import socket

        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult, LoginPassword

        self.messages: list[bytes] = []
        self.logins: list[tuple[str, str]] = []
        cert, key = self_signed(folder)
        self.ca = cert
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        smtp = self

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
                smtp.messages.append(envelope.original_content or envelope.content)
                return "250 OK"

        def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
            if isinstance(data, LoginPassword):
                user, pw = data.login.decode(), data.password.decode()
                smtp.logins.append((user, pw))
                return AuthResult(success=user == "lab@example.org" and pw == password)
            return AuthResult(success=False)

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.controller = Controller(
            Handler(), hostname="127.0.0.1", port=self.port, tls_context=context,
            require_starttls=True, authenticator=authenticator, auth_require_tls=True,
        )  # fmt: skip
        self.controller.start()

    def close(self) -> None:
        self.controller.stop()


