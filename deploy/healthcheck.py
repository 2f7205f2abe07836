#!/usr/bin/env python3
"""Container health check for the fedfuse image (installed as ``fedfuse-healthcheck``).

GETs a Flower ``/health`` endpoint and exits 0 on HTTP 200, 1 otherwise. Both Flower processes serve one:

- the SuperLink on its single HTTPS port (Fleet, Control and Runtime APIs share it; 8000 here):
  ``fedfuse-healthcheck https://localhost:8000/health --cafile /certs/ca.crt``
- a SuperNode on its local Runtime API (plain HTTP, bound to 127.0.0.1:9094 by default), the default URL:
  ``fedfuse-healthcheck``

The SuperNode check says the process is up; whether it is connected to the SuperLink shows in
``flwr supernode ls`` on the coordinator (status ``online``). Standard library only.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:9094/health"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedfuse-healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("url", nargs="?", default=os.environ.get("FEDFUSE_HEALTH_URL", DEFAULT_URL))
    parser.add_argument(
        "--cafile",
        default=os.environ.get("FEDFUSE_HEALTH_CAFILE") or None,
        help="CA certificate that signed the server's TLS certificate (https URLs).",
    )
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    context = ssl.create_default_context(cafile=args.cafile) if args.url.startswith("https://") else None
    try:
        with urllib.request.urlopen(args.url, context=context, timeout=args.timeout) as response:
            status = response.status
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"unhealthy: {args.url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {args.url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
