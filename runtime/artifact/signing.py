"""Ed25519 signatures of kiln artifacts (through the ``cryptography`` package).

An artifact is native code (or PTX): loading one runs what it holds with the rights of the
loading process, exactly like loading a shared library. The SHA-256s in the container catch
accidents; they say nothing about who wrote the file, since anyone can recompute them. A
signature does: ``kiln.export(..., sign_key=)`` signs, ``kiln.load(..., trusted_keys=)`` loads
only what one of the trusted keys signed.

Keys are ordinary Ed25519 keys, for example made with OpenSSL:

    openssl genpkey -algorithm ed25519 -out kiln-signing.pem        # private: keep it safe
    openssl pkey -in kiln-signing.pem -pubout -out kiln-signing.pub  # public: give it out

A private key may be given as a ``cryptography`` Ed25519PrivateKey, PEM bytes, or the path of
an (unencrypted) PEM file; a public key as an Ed25519PublicKey, its 32 raw bytes, PEM bytes,
or the path of a PEM file. ``KILN_TRUSTED_KEYS`` (paths separated by ``os.pathsep``) sets the
trusted keys of every load that names none.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kiln.ir import KilnError

SIGNATURE_DOMAIN = b"kiln artifact signature v1\0"
_MAX_KEY_FILE = 64 << 10


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ModuleNotFoundError:
        raise KilnError("signing and checking signatures of kiln artifacts needs the "
                        "'cryptography' package", hint="pip install 'kiln[sign]'") from None
    return ed25519, serialization


def available() -> bool:
    """Whether signatures can be made and checked here (``cryptography`` is installed)."""
    try:
        _crypto()
    except KilnError:
        return False
    return True


def _read_key_bytes(spec: Any, what: str) -> bytes:
    if isinstance(spec, (bytes, bytearray, memoryview)):
        return bytes(spec)
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        try:
            with open(path, "rb") as f:
                data = f.read(_MAX_KEY_FILE + 1)
        except OSError as e:
            raise KilnError(f"cannot read {what} {path}: {e.strerror or e}") from None
        if len(data) > _MAX_KEY_FILE:
            raise KilnError(f"{what} {path} is too large to be a key file")
        return data
    raise KilnError(f"{what} must be an Ed25519 key, PEM bytes or a file path, got "
                    f"{type(spec).__name__}")


def private_key(spec: Any):
    """An Ed25519PrivateKey from ``spec`` (see the module docstring)."""
    ed25519, serialization = _crypto()
    if isinstance(spec, ed25519.Ed25519PrivateKey):
        return spec
    data = _read_key_bytes(spec, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise KilnError(f"the signing key is not an unencrypted PEM private key: {e}",
                        hint="make one with: openssl genpkey -algorithm ed25519 -out key.pem"
                        ) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KilnError(f"the signing key is a {type(key).__name__}, not an Ed25519 key",
                        hint="make one with: openssl genpkey -algorithm ed25519 -out key.pem")
    return key


def public_key_bytes(spec: Any) -> bytes:
    """The 32 raw bytes of the Ed25519 public key ``spec`` (a private key gives its public
    half)."""
    ed25519, serialization = _crypto()
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    if isinstance(spec, ed25519.Ed25519PrivateKey):
        spec = spec.public_key()
    if isinstance(spec, ed25519.Ed25519PublicKey):
        return spec.public_bytes(*raw)
    data = _read_key_bytes(spec, "trusted key")
    if len(data) == 32 and not isinstance(spec, (str, os.PathLike)):
        return data
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise KilnError(f"trusted key {spec if isinstance(spec, (str, os.PathLike)) else ''} "
                        f"is not a PEM public key: {e}",
                        hint="export it with: openssl pkey -in key.pem -pubout -out key.pub"
                        ) from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise KilnError(f"trusted key is a {type(key).__name__}, not an Ed25519 key")
    return key.public_bytes(*raw)


def key_id(public: bytes) -> str:
    """A short name of a public key: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(public).hexdigest()[:16]


def trusted_keys(spec: Any) -> list[bytes] | None:
    """The raw public keys of ``spec`` (one key or an iterable of them); with None, those
    ``KILN_TRUSTED_KEYS`` names, or None when it is unset (no policy)."""
    if spec is None:
        env = os.environ.get("KILN_TRUSTED_KEYS", "")
        paths = [p for p in env.split(os.pathsep) if p]
        if not paths:
            return None
        spec = paths
    if isinstance(spec, (str, os.PathLike, bytes, bytearray, memoryview)) \
            or not isinstance(spec, Iterable):
        spec = [spec]
    keys = [public_key_bytes(k) for k in spec]
    if not keys:
        raise KilnError("trusted_keys is empty: no artifact could be loaded",
                        hint="pass the public keys of the artifacts' signers, or None")
    return keys


def sign(message: bytes, key: Any) -> tuple[bytes, bytes]:
    """(public key, signature) of ``SIGNATURE_DOMAIN + message`` by ``key``."""
    key = private_key(key)
    return public_key_bytes(key), key.sign(SIGNATURE_DOMAIN + message)


def verify(message: bytes, public: bytes, signature: bytes) -> bool:
    ed25519, _ = _crypto()
    from cryptography.exceptions import InvalidSignature

    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public).verify(
            signature, SIGNATURE_DOMAIN + message)
    except (InvalidSignature, ValueError):
        return False
    return True
