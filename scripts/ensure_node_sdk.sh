#!/usr/bin/env bash
# Installs the official OpenAI Node SDK the end-to-end tests drive (tests/e2e/node, pinned by its
# package-lock.json). Without node or npm the Node test is skipped, except under CI=true, where
# it fails: a green CI must have run it.
set -u
cd "$(dirname "$0")/../tests/e2e/node"
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "ensure_node_sdk: node/npm are not installed; the Node SDK test will be skipped" >&2
  [[ "${CI:-}" == "true" || "${CI:-}" == "1" ]] && exit 1
  exit 0
fi
if [[ -d node_modules/openai && node_modules/.package-lock.json -nt package-lock.json ]]; then
  exit 0
fi
npm ci --no-audit --no-fund --loglevel=error
