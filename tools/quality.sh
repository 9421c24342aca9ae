#!/usr/bin/env bash
# The quality gate CI runs before the tests (`make lint`): ruff's small rule set, the 400-line
# limit on modules in hinge_cli/, and, where the `duplicates` command exists, no repeated code (boilerplate rows aside).
# Every check runs, so one report lists everything to fix; the exit status is 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
MAX_LINES=400
failed=()

echo "== ruff check hinge_cli tests benchmarks"
if ! "$PYTHON" -m ruff check hinge_cli tests benchmarks; then
    failed+=("ruff: fix the findings above (\`ruff check --fix\` sorts imports; see [tool.ruff] in pyproject.toml)")
fi

echo "== modules in hinge_cli/ over $MAX_LINES lines"
long=$(find hinge_cli -name '*.py' -not -path '*/__pycache__/*' -exec wc -l {} + | grep -v ' total$' | sort -rn \
       | awk -v max="$MAX_LINES" '$1 > max { printf "%s: %d lines\n", $2, $1 }')
if [ -n "$long" ]; then
    echo "$long"
    failed+=("module size: split the files above into modules of at most $MAX_LINES lines, one job each")
else
    echo "none"
fi

echo "== duplicates"
if command -v duplicates >/dev/null; then
    # It always exits 0: the verdict is in its rows ("D1 a.py:1-9 ~ b.py:5-13 ...") and any "incomplete:" line.
    # Rows it marks `boilerplate` share only thin, recurring shapes (flag lists, path accessors): shown, not failed.
    report=$(duplicates)
    echo "$report"
    if grep -E '^D[0-9]+ ' <<<"$report" | grep -vq 'boilerplate'; then
        failed+=("duplicates: make each pair listed above (not marked boilerplate) one piece of code")
    elif grep -q '^incomplete:' <<<"$report"; then
        failed+=("duplicates: it did not read the whole tree (see 'incomplete:' above), so it cannot vouch for it")
    fi
else
    echo "skipped: the duplicates command is not on PATH"
fi

if [ ${#failed[@]} -gt 0 ]; then
    echo
    echo "quality gate FAILED (${#failed[@]} of 3 checks):"
    printf '  - %s\n' "${failed[@]}"
    exit 1
fi
echo
echo "quality gate passed"
