#!/usr/bin/env bash
# Writes throw-away PKI files for the TLS tests into DIR (created if needed):
#   ca.pem / ca.key              the test CA
#   server.pem / server.key      server certificate for localhost and 127.0.0.1, signed by the CA
#   client.pem / client.key      client certificate (clientAuth), signed by the CA
#   wrong-ca.pem / wrong-ca.key  an unrelated CA
#   wrong-client.pem / .key      a client certificate signed by the unrelated CA
# Exit 77 when openssl is missing (ctest reports the test skipped).
set -euo pipefail
dir=${1:?usage: make_test_certs.sh DIR}
command -v openssl >/dev/null || { echo "openssl not found" >&2; exit 77; }
mkdir -p "$dir"
cd "$dir"
days=2
make_ca() {  # NAME SUBJECT
  openssl req -x509 -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.pem" -days "$days" \
    -subj "/CN=$2" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
}
make_leaf() {  # NAME CA SUBJECT EXTFILE
  openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "/CN=$3" 2>/dev/null
  openssl x509 -req -in "$1.csr" -CA "$2.pem" -CAkey "$2.key" -CAcreateserial -out "$1.pem" \
    -days "$days" -extfile "$4" 2>/dev/null
  rm -f "$1.csr"
}
cat > server.ext <<'EXT'
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1
EXT
cat > client.ext <<'EXT'
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth
EXT
make_ca ca "nvfp4cal test CA"
make_ca wrong-ca "unrelated test CA"
make_leaf server ca localhost server.ext
make_leaf client ca "nvfp4cal test client" client.ext
make_leaf wrong-client wrong-ca "unrelated client" client.ext
rm -f server.ext client.ext ./*.srl
