"""Certificates for mTLS between the controller, the agents and their callers: one CA, one
key pair per party.

Each certificate serves both as a server certificate (its gRPC server) and as a client
certificate (its calls), for the given host names and addresses, and names who holds it: one
URI subject alternative name, `xcha://ROLE/NAME` (an agent: `xcha://agent/DATANODE/MEMBER`).
The servers authorize every call by that identity (`xcha.authz`); the CA vouches for it, so
only who holds the CA's key can make one.
"""

import datetime
import ipaddress
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from xcha.config import TlsConfig
from xcha.errors import InvalidInput
from xcha.names import check_host, check_name

log = logging.getLogger(__name__)

VALIDITY = datetime.timedelta(days=825)
# Status and metrics warn this long before a certificate expires.
EXPIRY_WARNING = datetime.timedelta(days=30)
DEFAULT_HOSTS = ("127.0.0.1", "::1", "localhost")
SCHEME = "xcha://"
# agent: beside one PostgreSQL instance; controller: decides and sends node-role messages;
# operator: `xcha ctl`; coordinator: reports datanodes it cannot reach; monitor: reads status.
ROLES = ("agent", "controller", "operator", "coordinator", "monitor")


@dataclass(frozen=True)
class Identity:
    """Who holds a certificate: a role and a name (an agent's name is its member, in its datanode)."""

    role: str
    name: str
    datanode: str = ""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise InvalidInput(f"invalid role {self.role!r}: use one of {', '.join(ROLES)}")
        check_name(self.name, f"{self.role} name")
        if self.role == "agent":
            check_name(self.datanode, "datanode name of an agent")
        elif self.datanode:
            raise InvalidInput(f"only an agent names a datanode, not a {self.role}")

    @property
    def path(self) -> str:
        """ROLE/NAME, or agent/DATANODE/MEMBER: how the command line spells an identity."""
        return (
            f"{self.role}/{self.datanode}/{self.name}" if self.role == "agent" else f"{self.role}/{self.name}"
        )

    @property
    def uri(self) -> str:
        return SCHEME + self.path

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def parse(cls, text: str) -> "Identity":
        """xcha://ROLE/NAME, xcha://agent/DATANODE/MEMBER, or the same without the scheme."""
        parts = text.removeprefix(SCHEME).split("/")
        if parts[0] == "agent" and len(parts) == 3:
            return cls("agent", parts[2], parts[1])
        if parts[0] in ROLES and parts[0] != "agent" and len(parts) == 2:
            return cls(parts[0], parts[1])
        raise InvalidInput(
            f"invalid identity {text[:100]!r}: expected ROLE/NAME (ROLE one of {', '.join(ROLES[1:])}) "
            "or agent/DATANODE/MEMBER"
        )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Mode 0600 from the first byte on: never readable by others, not even for a moment."""
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        os.fchmod(handle.fileno(), 0o600)  # an existing file keeps its mode through O_CREAT
        handle.write(data)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "xcha"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def create_ca(directory: Path) -> tuple[Path, Path]:
    """A new certificate authority: ca.pem and ca.key in directory."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name("xcha CA"))
        .issuer_name(_name("xcha CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    (directory / "ca.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    _write_key(directory / "ca.key", key)
    return directory / "ca.pem", directory / "ca.key"


def issue(
    directory: Path,
    identity: Identity,
    hosts: tuple[str, ...] = DEFAULT_HOSTS,
    validity: datetime.timedelta = VALIDITY,
) -> tuple[Path, Path]:
    """NAME.pem and NAME.key (NAME: identity.name, a member's name for an agent) signed by the
    CA in directory, naming identity, valid for hosts."""
    if not hosts:
        raise InvalidInput("a certificate needs at least one host name or address")
    for host in hosts:
        check_host(host, "certificate host")
    try:
        ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    except OSError as error:
        raise InvalidInput(f"no CA in {directory}: {error.strerror} ({error.filename})") from None
    except ValueError as error:
        raise InvalidInput(f"the CA in {directory} is unreadable: {error}") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise InvalidInput(f"{directory / 'ca.key'} is not the EC key `xcha tls init` makes")
    key = ec.generate_private_key(ec.SECP256R1())
    alternative: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
    for host in hosts:
        try:
            alternative.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alternative.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(identity.path))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(x509.SubjectAlternativeName(alternative), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem, key_path = directory / f"{identity.name}.pem", directory / f"{identity.name}.key"
    pem.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    _write_key(key_path, key)
    return pem, key_path


@dataclass(frozen=True)
class CertificateInfo:
    """What `xcha tls show` prints and the servers check: who, for which hosts, until when."""

    identity: Identity | None
    problem: str  # why identity is None
    subject: str
    issuer: str
    hosts: tuple[str, ...]
    not_before: datetime.datetime
    not_after: datetime.datetime

    def remaining(self, now: datetime.datetime | None = None) -> datetime.timedelta:
        return self.not_after - (now or datetime.datetime.now(datetime.UTC))

    def expiry_warning(self, now: datetime.datetime | None = None) -> str:
        """A sentence when the certificate expires within EXPIRY_WARNING (or has), else ""."""
        remaining = self.remaining(now)
        if remaining <= datetime.timedelta(0):
            return f"the certificate of {self.who} expired on {self.not_after:%Y-%m-%d %H:%M} UTC"
        if remaining <= EXPIRY_WARNING:
            return (
                f"the certificate of {self.who} expires in {remaining.days} day(s), "
                f"on {self.not_after:%Y-%m-%d %H:%M} UTC: issue a new one (`xcha tls issue`)"
            )
        return ""

    @property
    def who(self) -> str:
        return str(self.identity) if self.identity else self.subject


def certificate_info(certificate: x509.Certificate) -> CertificateInfo:
    """The certificate's identity (exactly one xcha:// URI), hosts and validity."""
    try:
        names = list(certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        names = []
    except ValueError as error:  # a malformed extension (only parsed when asked for)
        raise InvalidInput(
            f"certificate {certificate.subject.rfc4514_string()} is unreadable: {error}"
        ) from None
    uris = [
        n.value for n in names if isinstance(n, x509.UniformResourceIdentifier) and n.value.startswith(SCHEME)
    ]
    identity, problem = None, ""
    if len(uris) == 1:
        try:
            identity = Identity.parse(uris[0])
        except InvalidInput as error:
            problem = str(error)
    else:
        problem = f"{len(uris)} xcha:// identities in its subject alternative names, not one"
    hosts = [str(n.value) for n in names if isinstance(n, x509.DNSName | x509.IPAddress)]
    return CertificateInfo(
        identity,
        problem,
        certificate.subject.rfc4514_string(),
        certificate.issuer.rfc4514_string(),
        tuple(hosts),
        certificate.not_valid_before_utc,
        certificate.not_valid_after_utc,
    )


def read_certificate(pem: bytes, what: str = "certificate") -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as error:
        raise InvalidInput(f"{what} is no PEM certificate: {error}") from None


def describe(path: Path) -> str:
    """`xcha tls show FILE`: identity, role, name, hosts and expiry, one per line."""
    try:
        pem = path.read_bytes()
    except OSError as error:
        raise InvalidInput(f"cannot read {path}: {error.strerror}") from None
    info = certificate_info(read_certificate(pem, str(path)))
    identity = info.identity
    remaining = info.remaining()
    rows = [("file", str(path))]
    if identity is None:
        rows.append(("identity", f"none ({info.problem}): this certificate may call no xcha RPC"))
    else:
        rows += [("identity", identity.uri), ("role", identity.role)]
        if identity.datanode:
            rows.append(("datanode", identity.datanode))
        rows.append(("name", identity.name))
    rows += [
        ("hosts", ", ".join(info.hosts) or "none"),
        ("subject", info.subject),
        ("issuer", info.issuer),
        ("valid from", f"{info.not_before:%Y-%m-%d %H:%M} UTC"),
        (
            "expires",
            f"{info.not_after:%Y-%m-%d %H:%M} UTC "
            + (f"({remaining.days} days left)" if remaining.total_seconds() > 0 else "(expired)"),
        ),
    ]
    if warning := info.expiry_warning():
        rows.append(("warning", warning))
    return "\n".join(f"{label:<11} {value}" for label, value in rows) + "\n"


def _public(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass(frozen=True)
class Files:
    """The contents of one [tls] section's files, checked: the key is the certificate's, the
    CA issued the certificate, and the certificate names an identity."""

    ca: bytes
    cert: bytes
    key: bytes
    info: CertificateInfo
    ca_info: CertificateInfo

    @property
    def identity(self) -> Identity:
        assert self.info.identity is not None  # checked when read
        return self.info.identity

    def warnings(self) -> list[str]:
        return [w for w in (self.info.expiry_warning(), self.ca_info.expiry_warning()) if w]


def _issued(certificate: x509.Certificate, authority: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(authority)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def read_files(config: TlsConfig) -> Files:
    try:
        ca, cert, key = config.read()
    except OSError as error:
        raise InvalidInput(f"cannot read {error.filename}: {error.strerror}") from None
    certificate = read_certificate(cert, f"tls.cert_file {config.cert_file}")
    try:
        authorities = x509.load_pem_x509_certificates(ca)  # a bundle of CAs (while one is renewed)
    except ValueError as error:
        raise InvalidInput(f"tls.ca_file {config.ca_file} is no PEM certificate: {error}") from None
    try:
        private = serialization.load_pem_private_key(key, None)
    except (ValueError, TypeError) as error:
        raise InvalidInput(f"tls.key_file {config.key_file} is no unencrypted PEM key: {error}") from None
    if _public(private.public_key()) != _public(certificate.public_key()):
        raise InvalidInput(f"tls.key_file {config.key_file} is not the key of {config.cert_file}")
    authority = next((ca for ca in authorities if _issued(certificate, ca)), None)
    if authority is None:
        raise InvalidInput(f"{config.cert_file} was not issued by the CA of {config.ca_file}")
    info = certificate_info(certificate)
    if info.identity is None:
        raise InvalidInput(
            f"{config.cert_file} names no xcha identity ({info.problem}): every call with it would "
            "be refused; make one with `xcha tls issue`"
        )
    return Files(ca, cert, key, info, certificate_info(authority))


class Material:
    """One [tls] section's files as the process uses them: read and checked at start, read
    again on SIGHUP (`reload_certificates`) so that certificates are renewed without a restart.
    `generation` counts the reloads; servers and channels pick up a new one at their next
    handshake (`xcha.rpc`)."""

    def __init__(self, config: TlsConfig) -> None:
        self.config = config
        self.files = read_files(config)
        self.generation = 0
        self.listeners: list[Callable[[str], None]] = []  # told of expiry warnings, after the log
        self._warn()

    def _warn(self) -> None:
        for warning in self.files.warnings():
            log.warning("%s", warning)
            for listener in self.listeners:
                listener(warning)

    def require(self, role: str, identity: Identity | None = None) -> None:
        """This process's own certificate must name its role (and, for an agent, its member):
        with another identity every call it makes would be refused."""
        own = self.files.identity
        if own.role != role or (identity is not None and own != identity):
            wanted = identity or f"a {role}"
            raise InvalidInput(
                f"tls.cert_file {self.config.cert_file} names {own}, but this process is {wanted}: "
                f"its calls would be refused; make its certificate with `xcha tls issue`"
            )

    def reload(self) -> bool:
        """Read the files again; True when they changed and were taken. A certificate that fails
        the checks, or names another identity, is refused and the old one kept."""
        try:
            files = read_files(self.config)
        except InvalidInput as error:
            log.error("certificates not reloaded, the old ones stay in use: %s", error)
            return False
        if files.identity != self.files.identity:
            log.error(
                "certificates not reloaded: %s names %s instead of %s (an identity does not change)",
                self.config.cert_file,
                files.identity,
                self.files.identity,
            )
            return False
        if (files.ca, files.cert, files.key) == (self.files.ca, self.files.cert, self.files.key):
            log.info("certificates unchanged (%s)", self.config.cert_file)
            return False
        self.files = files
        self.generation += 1
        log.info(
            "certificates reloaded: %s, valid until %s UTC",
            files.identity,
            f"{files.info.not_after:%Y-%m-%d %H:%M}",
        )
        self._warn()
        return True


_materials: dict[TlsConfig, Material] = {}


def require_identity(config: TlsConfig, role: str, identity: Identity | None = None) -> None:
    """At a daemon's start: its certificate names its role (`Material.require`); insecure: nothing."""
    if not config.insecure:
        material(config).require(role, identity)


def material(config: TlsConfig) -> Material:
    """The process's one Material for these files (servers and channels share it)."""
    if config not in _materials:
        _materials[config] = Material(config)
    return _materials[config]


def reload_certificates() -> None:
    """SIGHUP: every [tls] file set in use is read again."""
    if not _materials:
        log.info("SIGHUP: no certificates in use (insecure), nothing to reload")
    for used in list(_materials.values()):
        used.reload()
