#!/bin/sh
# One image, one role per container: api | worker | webhooks | serve (all-in-one) | anything else goes to the CLI.
set -eu
role="${1:-api}"
[ $# -gt 0 ] && shift
case "$role" in
  api)
    exec uvicorn --factory app.main:create_app --host 0.0.0.0 --port "${PORT:-8000}" "$@" ;;
  worker)
    # One process per GPU: CUDA cannot be forked, so the pool is solo and the model loads once.
    exec celery -A workers.celery_app worker -P solo -c 1 -Q "${EIGENSHIFT_QUEUE:-eigenshift}" \
      --loglevel INFO --without-gossip --without-mingle "$@" ;;
  webhooks)
    # Webhook deliveries beside the steps: their own queue, a few threads, no model.
    exec celery -A workers.celery_app worker -P threads -c 4 -Q "${EIGENSHIFT_WEBHOOK_QUEUE:-eigenshift-webhooks}" \
      -n "webhooks@%h" --loglevel INFO --without-gossip --without-mingle "$@" ;;
  serve)
    exec python -m app.cli serve --host 0.0.0.0 --port "${PORT:-8000}" "$@" ;;
  *)
    exec python -m app.cli "$role" "$@" ;;
esac
