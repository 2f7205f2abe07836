#!/bin/sh
# The flwr CLI, pointed at this deployment's SuperLink (installed in the image as `fedfuse-flwr`).
#
# It writes $FLWR_HOME/config.toml with one connection, "fedfuse":
#     [superlink.fedfuse]  address = $SUPERLINK_ADDRESS  root-certificates = $CA_CERT
# (flwr 1.41 reads connections from there, not from pyproject.toml), then either
#
#   fedfuse-flwr register-supernodes [DIR]
#       registers DIR/<institution>/supernode-auth.key.pub for every institution folder in DIR
#       (default /pubkeys) with `flwr supernode register <key.pub> fedfuse --name <institution>`;
#       a key the SuperLink already holds ("Public key already in use") counts as done, so it can rerun;
#   fedfuse-flwr ARGS...
#       runs `flwr ARGS...`, e.g. `fedfuse-flwr supernode ls fedfuse` or
#       `fedfuse-flwr run /opt/fedfuse fedfuse --stream --run-config '...'`.
#
# Environment: SUPERLINK_ADDRESS (default superlink:8000; the host name must be one of the SuperLink
# certificate's SANs), CA_CERT (absolute path, default /certs/ca.crt), FLWR_HOME (default /tmp/flwr-home).
set -eu

SUPERLINK_ADDRESS="${SUPERLINK_ADDRESS:-superlink:8000}"
CA_CERT="${CA_CERT:-/certs/ca.crt}"
FLWR_HOME="${FLWR_HOME:-/tmp/flwr-home}"
export FLWR_HOME

case "$CA_CERT" in
  /*) ;;
  *) echo "fedfuse-flwr: CA_CERT must be an absolute path (flwr requires it), got '$CA_CERT'" >&2; exit 2 ;;
esac
if [ ! -r "$CA_CERT" ]; then
  echo "fedfuse-flwr: cannot read the CA certificate $CA_CERT" >&2
  exit 2
fi

mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "fedfuse"

[superlink.fedfuse]
address = "$SUPERLINK_ADDRESS"
root-certificates = "$CA_CERT"
EOF

if [ "${1:-}" != "register-supernodes" ]; then
  exec flwr "$@"
fi

dir="${2:-/pubkeys}"
found=0
for key in "$dir"/*/supernode-auth.key.pub; do
  [ -f "$key" ] || continue
  found=$((found + 1))
  institution=$(basename "$(dirname "$key")")
  if out=$(flwr supernode register "$key" fedfuse --name "$institution" 2>&1); then
    echo "registered the SuperNode key of $institution ($key)"
  elif printf '%s' "$out" | grep -q "already in use"; then
    echo "the SuperNode key of $institution is already registered"
  else
    printf '%s\n' "$out" >&2
    echo "fedfuse-flwr: registering $key failed" >&2
    exit 1
  fi
done
if [ "$found" -eq 0 ]; then
  echo "fedfuse-flwr: no $dir/<institution>/supernode-auth.key.pub found" >&2
  exit 1
fi
