#!/usr/bin/env bash
# Runs every test: installs what is missing, builds (tests included), brings
# up PostgreSQL, Redis, Kafka and the SCIM peer where they are not running,
# then ctest: the Criterion unit tests of every library module and the
# integration tests (end to end, crash, bad input), which start their own
# isolated services (fresh database, topic prefix, private SCIM peer).
# Extra arguments go to ctest (e.g. -L unit, -R e2e).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${QM_BUILD_DIR:-$ROOT/build}"
say() { printf '[qm] %s\n' "$*"; }

bash "$ROOT/deploy/local/install-deps.sh"
say "building into $BUILD (with tests)"
cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DQM_BUILD_TESTS=ON >/dev/null
cmake --build "$BUILD" -j"$(nproc)"
bash "$ROOT/deploy/local/stack.sh" up
say "running the tests"
cd "$BUILD"
ctest --output-on-failure --timeout 900 "$@"
