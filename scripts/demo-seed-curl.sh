#!/usr/bin/env bash
# The curl examples of both seed documents, run with real curl against the gateway: verbatim but
# for the ids (taken from earlier answers), the host (GATEWAY_URL) and one typo. Each command is
# printed as written, then run with `-sS -o FILE -w '%{http_code}'` appended to catch its answer.
#
#   scripts/demo-seed-curl.sh                       (`just demo-seed-curl`)
#   GATEWAY_URL=http://127.0.0.1:18080 scripts/demo-seed-curl.sh
set -euo pipefail

# The seeds say localhost; so do we, unless told otherwise.
BASE=${GATEWAY_URL:-http://localhost:${GATEWAY_PORT:-8080}}
# The real interpreter behind python3 (a pyenv shim costs a second per call).
PYTHON=$(python3 -c 'import sys; print(sys.executable)')
BODY=""
STATUS=""
EXAMPLES=0

# run EXPECTED COMMAND: print the command, run it, print the HTTP status and the body; stop if the
# status is not EXPECTED. The body is left in $BODY.
run() {
  local expected=$1 command=$2 out
  printf '\n$ %s\n' "$command"
  out=$(mktemp)
  STATUS=$(eval "$command -sS -o '$out' -w '%{http_code}'")
  BODY=$(cat "$out")
  rm -f "$out"
  printf '  ← HTTP %s  %s\n' "$STATUS" "$(pretty "$BODY")"
  EXAMPLES=$((EXAMPLES + 1))
  if [ "$STATUS" != "$expected" ]; then
    printf '\n✗ FAILED: expected HTTP %s, got %s\n' "$expected" "$STATUS"
    exit 1
  fi
}

# A JSON answer on one line; a long list as its length and its first two items.
pretty() {
  "$PYTHON" -c '
import json, sys
try:
    data = json.loads(sys.argv[1])
except ValueError:
    print(sys.argv[1][:300]); sys.exit()
one = lambda item: json.dumps(item, ensure_ascii=False)
if isinstance(data, list) and len(data) > 2:
    print(f"[{len(data)} orders; the first two:]\n" + "\n".join("    " + one(o) for o in data[:2]))
else:
    print(one(data))' "$1"
}

# field NAME: a field of the last answer, which must look like an id.
field() {
  local value
  value=$("$PYTHON" -c 'import json, sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$BODY" "$1")
  [[ $value =~ ^[0-9a-fA-F-]{36}$ ]] || { echo "✗ FAILED: $1 is not an id: $value"; exit 1; }
  echo "$value"
}

# expect_field NAME VALUE: the last answer's field NAME is VALUE.
expect_field() {
  local value
  value=$("$PYTHON" -c 'import json, sys; print(json.loads(sys.argv[1]).get(sys.argv[2]))' "$BODY" "$1")
  if [ "$value" != "$2" ]; then
    printf '✗ FAILED: expected %s=%s, got %s\n' "$1" "$2" "$value"
    exit 1
  fi
  printf '  ✓ %s=%s\n' "$1" "$2"
}

# wait_paid ORDER_ID: poll the order's status quietly until it is no longer new.
wait_paid() {
  local answer
  for _ in $(seq 1 600); do
    answer=$(curl -sS "$BASE/orders/$1/status")
    [[ $answer == *'"status":"new"'* ]] || return 0
    sleep 0.05
  done
  echo "✗ FAILED: order $1 still new after 30 s"
  exit 1
}

echo "Seed curl examples against $BASE"

echo
echo "== Seed 000 (Online Store: Orders & Payments), in the order of its README"
echo "   Its first code block writes the first call as"
echo '     CURL -X POST "http:/localhost:8080/accounts/create"'
echo "   (upper-case CURL is not a command, http:/ is missing a slash): run as the README spells it."

run 201 "curl -X POST \"$BASE/accounts/create\""
ACCOUNT_ID=$(field account_id)

run 200 "curl -X POST $BASE/accounts/top_up \\
  -H \"Content-Type: application/json\" \\
  -d '{\"account_id\":\"$ACCOUNT_ID\",\"amount\":10000}'"
expect_field balance 10000

run 200 "curl -X GET \"$BASE/accounts/$ACCOUNT_ID/balance\""

echo
echo "   The account id doubles as the user id (an account made without a body is a new user)."
run 201 "curl -X POST $BASE/orders/create \\
  -H \"Content-Type: application/json\" \\
  -d '{
    \"user_id\":\"$ACCOUNT_ID\",
    \"amount\":2500,
    \"description\":\"Книга\"
  }'"
ORDER_ID=$(field id)
expect_field status new

run 200 "curl -X GET $BASE/orders"

echo
echo "   «Для демонстрации асинхронности создайте заказ и проследите смену его статуса»:"
wait_paid "$ORDER_ID"
run 200 "curl -X GET $BASE/orders/$ORDER_ID/status"
expect_field status paid

echo
echo "== Seed 004 (HSEPaymentSystem): its requests, as curl"
echo "   The seed sends the order requests to the Orders service at :8081; the gateway serves"
echo "   the same routes. Its deposit example has different user ids in path and body (…7269… vs"
echo "   …7268…), which is answered 422 here; both carry the same id below."
USER_ID=$("$PYTHON" -c 'import uuid; print(uuid.uuid4())')

run 201 "curl -X POST $BASE/accounts \\
  -H \"Content-Type: application/json\" \\
  -d '{
  \"user_id\": \"$USER_ID\"
}'"

run 200 "curl -X POST $BASE/accounts/$USER_ID/deposit \\
  -H \"Content-Type: application/json\" \\
  -d '{
  \"user_id\": \"$USER_ID\",
  \"amount\": 10000
}'"
expect_field balance 10000

run 200 "curl -X GET \"$BASE/accounts/balance?user_id=$USER_ID\""

run 201 "curl -X POST $BASE/orders \\
  -H \"Content-Type: application/json\" \\
  -d '{
    \"user_id\": \"$USER_ID\",
    \"amount\": 100,
    \"description\": \"Покупка Iphone 17\"
}'"
ORDER_ID=$(field id)

wait_paid "$ORDER_ID"
run 200 "curl -X GET $BASE/order/$ORDER_ID"
expect_field status paid

run 200 "curl -X GET $BASE/orders"

echo
echo "✓ all $EXAMPLES seed examples answered as expected"
