#!/usr/bin/env bash
# Regenerates scim-seed.json: 300 people p-0001..p-0300 and the app groups.
# Usage: gen-scim-seed.sh [output-file]   (default: scim-seed.json beside this script)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/scim-seed.json}"
count="${QM_SEED_USERS:-300}"
groups=(app-figma-viewer app-figma-editor app-github-read app-github-write
        app-aws-readonly app-aws-prod-admin app-salesforce-user app-netsuite-user
        app-slack-user app-zoom-user app-jira-user app-confluence-user
        app-datadog-user app-hubspot-user app-1password-user lic-adobe-cc lic-jetbrains)
tmp="$out.tmp.$$"
{
  printf '{\n  "users": [\n'
  for ((i = 1; i <= count; i++)); do
    n=$(printf '%04d' "$i")
    sep=','; ((i == count)) && sep=''
    printf '    {"userName": "p-%s", "displayName": "Person %s", "name": {"givenName": "Person", "familyName": "%s"}, "active": true, "emails": [{"value": "p-%s@example.com", "type": "work", "primary": true}]}%s\n' \
      "$n" "$n" "$n" "$n" "$sep"
  done
  printf '  ],\n  "groups": [\n'
  for ((i = 0; i < ${#groups[@]}; i++)); do
    sep=','; ((i == ${#groups[@]} - 1)) && sep=''
    printf '    {"displayName": "%s"}%s\n' "${groups[$i]}" "$sep"
  done
  printf '  ]\n}\n'
} >"$tmp"
mv "$tmp" "$out"
echo "[qm] wrote $out ($count users, ${#groups[@]} groups)"
