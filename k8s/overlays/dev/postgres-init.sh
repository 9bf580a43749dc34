#!/bin/bash
# Runs once, when the dev Postgres starts on an empty data directory (the image's
# entrypoint runs /docker-entrypoint-initdb.d/*). Two roles, as in production:
#   chat      POSTGRES_USER, owns the database; the migration Job's role
#   chat_app  the message service's role; the Job grants it DML after each migration
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  --set app_password="$(cat "$CHAT_APP_PASSWORD_FILE")" <<'SQL'
CREATE ROLE chat_app LOGIN PASSWORD :'app_password';
GRANT CONNECT ON DATABASE chat TO chat_app;
SQL
