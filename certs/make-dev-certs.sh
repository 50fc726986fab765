#!/usr/bin/env bash
# Makes a development PKI for the adapter's TLS listeners: a CA, a server certificate for
# localhost/127.0.0.1 and one client certificate whose CN is the MQTT username.
#   certs/make-dev-certs.sh [OUT_DIR] [CLIENT_CN]    (defaults: certs/dev, demo-sensor)
# Never use these files in production: the CA key sits next to them.
set -euo pipefail
out="${1:-$(dirname "$0")/dev}"
cn="${2:-demo-sensor}"
days=825
mkdir -p "$out"
cd "$out"

openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days "$days" \
  -keyout ca.key -out ca.crt -subj "/CN=mqtt-adapter dev CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

issue() { # name cn extendedKeyUsage [subjectAltName]
  local name=$1 subject=$2 eku=$3 san=${4:-}
  openssl req -newkey rsa:2048 -nodes -sha256 -keyout "$name.key" -out "$name.csr" -subj "/CN=$subject" 2>/dev/null
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$eku"
    if [ -n "$san" ]; then echo "subjectAltName=$san"; fi
  } > "$name.ext"
  openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days "$days" -sha256 \
    -extfile "$name.ext" -out "$name.crt" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
}

issue server localhost serverAuth "DNS:localhost,IP:127.0.0.1"
issue client "$cn" clientAuth
rm -f ca.srl
chmod 600 ./*.key
echo "wrote $(pwd)/{ca.crt,ca.key,server.crt,server.key,client.crt,client.key} (client CN=$cn)"
