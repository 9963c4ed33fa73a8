#!/usr/bin/env bash
# The MQTT tests need a real mosquitto binary. Install it from the system's packages
# when we can (root or passwordless sudo); otherwise stop with the exact command.
set -euo pipefail
if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
  exit 0
fi
cmd="apt-get update && apt-get install -y mosquitto mosquitto-clients"
if [ "$(id -u)" = 0 ]; then
  echo "mosquitto is missing: installing it ($cmd)" >&2
  sh -c "$cmd" >&2
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  echo "mosquitto is missing: installing it (sudo $cmd)" >&2
  sudo sh -c "$cmd" >&2
else
  echo "make test needs mosquitto. Install it with:" >&2
  echo "  sudo sh -c '$cmd'" >&2
  exit 1
fi
