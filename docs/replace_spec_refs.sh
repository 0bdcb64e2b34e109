#!/usr/bin/env bash
# One-off rewrite: every citation of the former internal method notes ("S·P·E·C §N", spelled
# without the dots) now points at docs/protocol.md §N, which uses the same section numbers.
# Rewrites the *.py and *.md files tracked by git (so never .venv), as plain text in Python files
# and as links to the section's heading in Markdown files. Lists any mention left and then fails.
# The pattern is written S[P]EC so that this file does not mention the name itself.
set -euo pipefail
cd "$(dirname "$0")/.."

slugs=(x models attacks negatives losses training-recipe feature-analysis the-papers-reported-numbers
       adaptive-evaluation)

py_rules=(-e 's/S[P]EC section ([1-8])/docs\/protocol.md §\1/g'
          -e "s/S[P]EC's mathematics/the mathematics of docs\/protocol.md/g"
          -e 's/S[P]EC §/docs\/protocol.md §/g')
md_rules=()
for n in 1 2 3 4 5 6 7 8; do
  md_rules+=(-e "s/S[P]EC §${n}(–[1-8]|-[1-8])?/[docs\/protocol.md §${n}\1](docs\/protocol.md#${n}-${slugs[$n]})/g")
done

mapfile -t py_files < <(git ls-files -- '*.py')
mapfile -t md_files < <(git ls-files -- '*.md')
[ ${#py_files[@]} -eq 0 ] || sed -E -i "${py_rules[@]}" "${py_files[@]}"
[ ${#md_files[@]} -eq 0 ] || sed -E -i "${md_rules[@]}" "${md_files[@]}"

if git grep -n 'S[P]EC' -- . ':!docs/replace_spec_refs.sh'; then
  echo "error: the mentions above were not rewritten; edit them by hand" >&2
  exit 1
fi
echo "done: every citation now points at docs/protocol.md"
