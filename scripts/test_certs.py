#!/usr/bin/env python3
"""TLS certificates for the security tests, into DIR (PEM files):

ca.pem/ca.key              a test CA
server.pem/server.key      signed by it, for 127.0.0.1 and localhost
expired.pem/expired.key    signed by it, for 127.0.0.1, valid only in 2020
selfsigned.pem/.key        for 127.0.0.1, signed by nobody but itself
client.pem/client.key      a client certificate signed by the CA (CN=e1)

usage: test_certs.py DIR   (needs the `cryptography` package: pip install cryptography)
"""
import datetime
import ipaddress
import os
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = datetime.datetime.now(datetime.timezone.utc)


def key():
    return ec.generate_private_key(ec.SECP256R1())


def name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def write(directory, stem, cert, private):
    with open(os.path.join(directory, stem + ".pem"), "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(os.path.join(directory, stem + ".key"), "wb") as f:
        f.write(private.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))


def leaf(cn, issuer, issuer_key, not_before, not_after, usage, san=True):
    private = key()
    builder = (x509.CertificateBuilder()
               .subject_name(name(cn))
               .issuer_name(issuer)
               .public_key(private.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(not_before)
               .not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), private


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    ca_key = key()
    ca = (x509.CertificateBuilder()
          .subject_name(name("isomesh test CA"))
          .issuer_name(name("isomesh test CA"))
          .public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(NOW - datetime.timedelta(days=1))
          .not_valid_after(NOW + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    write(out, "ca", ca, ca_key)
    day = datetime.timedelta(days=1)
    server = ExtendedKeyUsageOID.SERVER_AUTH
    write(out, "server", *leaf("127.0.0.1", ca.subject, ca_key, NOW - day, NOW + 30 * day, server))
    write(out, "expired", *leaf("127.0.0.1", ca.subject, ca_key,
                                datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc),
                                datetime.datetime(2020, 12, 31, tzinfo=datetime.timezone.utc),
                                server))
    selfsigned_key = key()
    selfsigned = (x509.CertificateBuilder()
                  .subject_name(name("127.0.0.1")).issuer_name(name("127.0.0.1"))
                  .public_key(selfsigned_key.public_key())
                  .serial_number(x509.random_serial_number())
                  .not_valid_before(NOW - day).not_valid_after(NOW + 30 * day)
                  .add_extension(x509.SubjectAlternativeName([
                      x509.DNSName("localhost"),
                      x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
                  .sign(selfsigned_key, hashes.SHA256()))
    write(out, "selfsigned", selfsigned, selfsigned_key)
    write(out, "client", *leaf("e1", ca.subject, ca_key, NOW - day, NOW + 30 * day,
                               ExtendedKeyUsageOID.CLIENT_AUTH, san=False))


if __name__ == "__main__":
    main()
