#!/usr/bin/env bash
# Debian packages the demo and tests use: python3-doc (Python's docs as plain-text sources, our local
# calibration and evaluation text) and prometheus (the metrics tests scrape the exporter with a real
# Prometheus and check rules with promtool). Installed when missing and we may (root + apt-get); else a hint.
set -euo pipefail
need=()
ls -d /usr/share/doc/python3*/html/_sources >/dev/null 2>&1 || need+=(python3-doc)
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || need+=(prometheus)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
else
  echo "missing Debian packages: ${need[*]} -- run: sudo apt-get install ${need[*]}" >&2
  exit 1
fi
